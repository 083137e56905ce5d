"""Text-to-image DiTs of the PixArt-alpha and SD3 classes, built small and trained on the shapes data.

Both are the real diffusers pipelines (``PixArtAlphaPipeline``: cross-attention, v-prediction on the DDPM
schedule, DPM-Solver sampling; ``StableDiffusion3Pipeline``: joint attention, flow matching, Euler sampling)
around the shared VAE. What makes CPU training fit in minutes: 16 image tokens (16x16 latents, 4x4 patches),
one token per caption word, frozen text encoders whose caption embeddings are computed once, latents of a
fixed pool of samples encoded once, and a cosine learning-rate schedule. 10% of captions are replaced by ""
(the pipelines' negative prompt), which is what makes classifier-free guidance work at sampling time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .loop import LossLog, Schedule, run_steps, settings_of
from .shapes import UNIFORM, Distribution, ShapeDataset, to_tensor
from .text import CaptionEmbeddings, word_clip_tokenizer, word_t5_tokenizer
from .vae import load_vae

#: Text tokens per encoder while training; PixArt masks padding, so sampling with its default 120 gives the
#: same result. SD3's joint attention has no mask, so its zoo spec passes ``max_sequence_length=16``.
TEXT_TOKENS = 16
TEXT_WIDTH = 64  # T5 width; the two CLIPs are half of it each (SD3 concatenates them to T5's width)


@dataclass(frozen=True)
class DitRecipe:
    name: str
    family: str  # "pixart" or "sd3"
    schedule: Schedule
    seed: int = 0
    heads: int = 4
    head_dim: int = 24
    layers: int = 4
    caption_dropout: float = 0.1
    distribution: Distribution = UNIFORM
    base: str | None = None  # fine-tune this shipped model instead of starting from random weights
    pool_size: int = 8192
    data_seed: int = 0
    #: PixArt only. "v_prediction" rather than PixArt-alpha's "epsilon": with 20 DPM-Solver steps from t = 999,
    #: an epsilon model's first image estimate divides its error by sqrt(alpha_bar) = 0.006, and a model trained
    #: for minutes then paints several blobs (measured: 27% shape, 33% colour adherence); v keeps it bounded.
    prediction: str = "v_prediction"

    def __post_init__(self) -> None:
        if self.family not in ("pixart", "sd3"):
            raise ValueError(f"{self.name}: family must be 'pixart' or 'sd3', got {self.family!r}")
        if self.prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"{self.name}: prediction must be 'epsilon' or 'v_prediction', got {self.prediction!r}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"{self.name}: caption_dropout must be in [0, 1), got {self.caption_dropout}")


def _pixart(recipe: DitRecipe, vae):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    from ..zoo.tiny_parts import t5_encoder

    tokenizer = word_t5_tokenizer(120)
    torch.manual_seed(recipe.seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=recipe.heads, attention_head_dim=recipe.head_dim, in_channels=4, out_channels=4,
        num_layers=recipe.layers, cross_attention_dim=recipe.heads * recipe.head_dim, caption_channels=TEXT_WIDTH,
        sample_size=16, patch_size=4, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
        norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True, activation_fn="gelu-approximate",
    )
    return PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=t5_encoder(recipe.seed + 2, d_model=TEXT_WIDTH, vocab=len(tokenizer)),
        vae=vae, transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                              prediction_type=recipe.prediction),
    )


def _sd3(recipe: DitRecipe, vae):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from ..zoo.tiny_parts import clip_text_encoder, t5_encoder

    clip, t5 = word_clip_tokenizer(TEXT_TOKENS), word_t5_tokenizer(TEXT_TOKENS)
    half = TEXT_WIDTH // 2
    torch.manual_seed(recipe.seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=4, in_channels=4, out_channels=4, num_layers=recipe.layers,
        attention_head_dim=recipe.head_dim, num_attention_heads=recipe.heads, joint_attention_dim=TEXT_WIDTH,
        caption_projection_dim=recipe.heads * recipe.head_dim, pooled_projection_dim=TEXT_WIDTH,
        pos_embed_max_size=8,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_text_encoder(recipe.seed + 2, hidden=half, vocab=len(clip), projection_dim=half),
        tokenizer=clip,
        text_encoder_2=clip_text_encoder(recipe.seed + 3, hidden=half, vocab=len(clip), projection_dim=half),
        tokenizer_2=word_clip_tokenizer(TEXT_TOKENS),
        text_encoder_3=t5_encoder(recipe.seed + 4, d_model=TEXT_WIDTH, vocab=len(t5)), tokenizer_3=t5,
    )


def build_pipeline(recipe: DitRecipe, vae):
    """The untrained pipeline of ``recipe`` around ``vae``."""
    pipe = _pixart(recipe, vae) if recipe.family == "pixart" else _sd3(recipe, vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(path: Path, family: str):
    from diffusers import PixArtAlphaPipeline, StableDiffusion3Pipeline

    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(f"no trained pipeline at {path}; train it with "
                                f"`python -m pytest_ditredundancy.train {Path(path).name}`")
    cls = PixArtAlphaPipeline if family == "pixart" else StableDiffusion3Pipeline
    pipe = cls.from_pretrained(path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class LatentPool:
    """Latents of a fixed set of samples, already in the pipeline's convention (scaled, SD3 also shifted)."""

    latents: torch.Tensor
    captions: list[str] = field(default_factory=list)

    @classmethod
    def encode(cls, vae, family: str, recipe: DitRecipe) -> "LatentPool":
        data = ShapeDataset(seed=recipe.data_seed, distribution=recipe.distribution)
        shift = vae.config.shift_factor if family == "sd3" else 0.0
        chunks, captions = [], []
        with torch.no_grad():
            for start in range(0, recipe.pool_size, 256):
                batch = data.batch(start, min(256, recipe.pool_size - start))
                z = vae.encode(to_tensor(batch.images)).latent_dist.mode()
                chunks.append((z - shift) * vae.config.scaling_factor)
                captions += batch.captions
        return cls(torch.cat(chunks), captions)


def diffusion_loss(pipe, family: str, x0: torch.Tensor, cond: dict, generator: torch.Generator) -> torch.Tensor:
    """The family's training objective on clean latents ``x0``: epsilon or v MSE on the DDPM schedule (PixArt,
    as its scheduler's ``prediction_type`` says) or flow matching (SD3)."""
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator)
    if family == "pixart":
        t = torch.randint(0, 1000, (n,), generator=generator)
        alpha = pipe.scheduler.alphas_cumprod[t].view(n, 1, 1, 1).float()
        xt = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        pred = pipe.transformer(xt, encoder_hidden_states=cond["encoder_hidden_states"], timestep=t,
                                encoder_attention_mask=cond["encoder_attention_mask"],
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        if pipe.scheduler.config.prediction_type == "v_prediction":
            return F.mse_loss(pred, alpha.sqrt() * noise - (1 - alpha).sqrt() * x0)
        return F.mse_loss(pred, noise)
    # SD3: logit-normal sigmas, shifted like the scheduler shifts them at sampling time
    shift = pipe.scheduler.config.shift
    s = torch.sigmoid(torch.randn(n, generator=generator))
    sigma = (shift * s / (1 + (shift - 1) * s)).view(n, 1, 1, 1)
    xt = (1 - sigma) * x0 + sigma * noise
    pred = pipe.transformer(xt, encoder_hidden_states=cond["encoder_hidden_states"],
                            pooled_projections=cond["pooled_projections"], timestep=sigma.flatten() * 1000).sample
    return F.mse_loss(pred, noise - x0)


def train_dit(recipe: DitRecipe, out: Path, weights: Path) -> dict:
    """Train (or fine-tune) ``recipe``'s transformer and save the whole pipeline with ``save_pretrained``."""
    if recipe.base is not None:
        pipe = load_pipeline(weights / recipe.base, recipe.family)
    else:
        pipe = build_pipeline(recipe, load_vae(weights / "vae"))
    embeddings = CaptionEmbeddings.compute(pipe, recipe.family, TEXT_TOKENS)
    pool = LatentPool.encode(pipe.vae, recipe.family, recipe)
    transformer = pipe.transformer.train()
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    size = recipe.schedule.batch_size
    generator = torch.Generator().manual_seed(recipe.seed + 17)
    log = LossLog(recipe.name, settings_of(recipe.schedule) | {
        "family": recipe.family, "heads": recipe.heads, "head_dim": recipe.head_dim, "layers": recipe.layers,
        "caption_dropout": recipe.caption_dropout, "pool_size": recipe.pool_size, "base": recipe.base,
        "prediction": recipe.prediction if recipe.family == "pixart" else "flow",
        "distribution": {k: dict(v) for k, v in recipe.distribution.weights.items()}})

    def loss_at(step: int) -> torch.Tensor:
        index = torch.randint(0, len(pool.captions), (size,), generator=generator)
        drop = torch.rand(size, generator=generator) < recipe.caption_dropout
        cond = embeddings.rows([pool.captions[i] for i in index.tolist()], drop)
        return diffusion_loss(pipe, recipe.family, pool.latents[index], cond, generator)

    run_steps(recipe.schedule, log, parameters, loss_at)
    transformer.eval()
    pipe.save_pretrained(out, safe_serialization=True)
    drop_local_paths(out)
    count = sum(p.numel() for p in transformer.parameters())
    log.save(out, {"transformer_parameters": count})
    return {"final_loss": log.losses[-1], "transformer_parameters": count, "seconds": round(log.seconds)}


def drop_local_paths(directory: Path) -> None:
    """Remove ``_name_or_path`` (where the components were loaded from on the training machine) from the saved
    configs: shipped files must not carry one machine's paths, and loading does not need them."""
    import json

    for path in Path(directory).rglob("*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "_name_or_path" in data:
            del data["_name_or_path"]
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


#: The shipped recipes. ``trained-pixart-ft`` continues ``trained-pixart`` on a shifted distribution: white
#: and gray backgrounds only, red shapes three times as often as each other colour.
RECIPES: dict[str, DitRecipe] = {
    "trained-pixart": DitRecipe("trained-pixart", "pixart", Schedule(steps=15000, lr=1e-3, warmup=100, batch_size=32),
                                heads=4, head_dim=32, layers=4),
    "trained-sd3": DitRecipe("trained-sd3", "sd3", Schedule(steps=8000, lr=1e-3, warmup=100, batch_size=32),
                             heads=3, head_dim=32, layers=4),
    "trained-pixart-ft": DitRecipe(
        "trained-pixart-ft", "pixart", Schedule(steps=400, lr=3e-4, warmup=20, batch_size=32),
        heads=4, head_dim=32, layers=4, base="trained-pixart", data_seed=1,
        distribution=Distribution({"background": {"white": 1.0, "gray": 1.0},
                                   "colour": {"red": 3.0, "green": 1.0, "blue": 1.0, "yellow": 1.0}})),
}
