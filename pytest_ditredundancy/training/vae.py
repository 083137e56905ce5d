"""The small VAE every trained DiT shares: a diffusers ``AutoencoderKL``, so the real pipelines decode with it.

32x32 RGB -> 16x16x4 latents (scale factor 2). The DiTs then use 4x4 patches, i.e. 16 image tokens: few
tokens is what makes CPU training of a text-to-image transformer fit in minutes. After training, the latents'
mean and standard deviation over the data set become ``shift_factor`` / ``scaling_factor`` (unit-variance
latents, as SD3 does it); PixArt's pipeline ignores the shift, so PixArt trains on ``z * scaling_factor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .loop import LossLog, Schedule, run_steps, settings_of
from .shapes import ShapeDataset, to_tensor


@dataclass(frozen=True)
class VaeRecipe:
    seed: int = 0
    channels: tuple[int, int] = (16, 16)
    layers_per_block: int = 0  # the mid-blocks' resnets do the work: 4x cheaper on a CPU than one per block
    latent_channels: int = 4
    kl_weight: float = 1e-5
    schedule: Schedule = Schedule(steps=1200, lr=2e-3, warmup=50, batch_size=32)


def build_vae(recipe: VaeRecipe):
    from diffusers import AutoencoderKL

    torch.manual_seed(recipe.seed)
    n = len(recipe.channels)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=recipe.channels, layers_per_block=recipe.layers_per_block, latent_channels=recipe.latent_channels,
        norm_num_groups=8, sample_size=32, mid_block_add_attention=False, shift_factor=0.0,
    )


def train_vae(recipe: VaeRecipe, out: Path) -> dict:
    """Train, measure the latent statistics, save with ``save_pretrained``; returns the training record."""
    vae = build_vae(recipe).train()
    data = ShapeDataset(seed=recipe.seed)
    size = recipe.schedule.batch_size
    generator = torch.Generator().manual_seed(recipe.seed)
    log = LossLog("vae", settings_of(recipe.schedule) | {"channels": list(recipe.channels)})

    def loss_at(step: int) -> torch.Tensor:
        x = to_tensor(data.batch(step * size, size).images)
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample(generator)).sample
        return F.l1_loss(y, x) + F.mse_loss(y, x) + recipe.kl_weight * posterior.kl().mean()

    run_steps(recipe.schedule, log, list(vae.parameters()), loss_at)
    vae.eval()
    with torch.no_grad():
        held_out = ShapeDataset(seed=recipe.seed + 1000).batch(0, 256)
        z = vae.encode(to_tensor(held_out.images)).latent_dist.mode()
        recon = vae.decode(z).sample
        error = (recon - to_tensor(held_out.images)).abs().mean().item()
    shift, scale = z.mean().item(), 1.0 / z.std().item()
    vae.register_to_config(scaling_factor=round(scale, 5), shift_factor=round(shift, 5))
    vae.save_pretrained(out)
    log.save(out, {"held_out_l1": round(error, 5), "scaling_factor": round(scale, 5), "shift_factor": round(shift, 5)})
    return {"held_out_l1": error}


def load_vae(path: Path):
    from diffusers import AutoencoderKL

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no trained VAE at {path}; train it first with "
                                "`python -m pytest_ditredundancy.train vae`")
    return AutoencoderKL.from_pretrained(path).eval()
