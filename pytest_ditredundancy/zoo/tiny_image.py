"""Tiny offline twins of the image DiT pipelines.

Each ``build_*`` returns the real diffusers pipeline class, wired with the scheduler family the real
checkpoint ships, so ``pipe(...)`` runs the real ``__call__`` (guidance batching, prompt encoding, latent
packing) on a transformer of the real class built from a small config. Weights are random but drawn from
``seeded(seed + k)``, one ``k`` per component, so equal seeds give bit-identical pipelines.

Sizes: 2 heads of 16 channels (hidden 32), two or more attention blocks, unfused Q/K/V, and a VAE whose
scale factor gives 64 image tokens at the catalog's tiny resolution (32 px with a 2x VAE; 128 px for
HunyuanDiT and Lumina2, whose pipelines hard-code a scale factor of 8). Text encoders are 2-layer models
over character-level tokenizers; sequence lengths stay those of the real pipelines.

PixArt, Sana and HunyuanDiT must be called with ``use_resolution_binning=False`` (the catalog passes it):
binning would snap the tiny size to the real models' 256-1024 px buckets. Forgetting it fails loudly for
PixArt and Sana ("Invalid sample size": their ``sample_size`` is the tiny latent size) but makes HunyuanDiT
silently run at 1024 px. Importing this module imports diffusers; the catalog imports it on first build.
"""

from __future__ import annotations

from diffusers import (
    AuraFlowPipeline, AuraFlowTransformer2DModel, AutoencoderDC, DDPMScheduler, DiTPipeline, DiTTransformer2DModel,
    DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
    HunyuanDiT2DModel, HunyuanDiTPipeline, Lumina2Pipeline, Lumina2Transformer2DModel, PixArtAlphaPipeline,
    PixArtSigmaPipeline, PixArtTransformer2DModel, SanaPipeline, SanaTransformer2DModel, SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import Gemma2Config, Gemma2Model

from .tiny_parts import bert_encoder, bert_tokenizer, clip_text_encoder, clip_tokenizer, gemma2_encoder, gemma_tokenizer, seeded, t5_encoder, t5_tokenizer, tiny_vae

HEADS, HEAD_DIM = 2, 16  # two wide heads: CPU attention costs ~2.5x less than four of width 8
HIDDEN = HEADS * HEAD_DIM  # transformer width; also the text encoders' width unless noted


def _ready(pipe):
    """Every tiny pipeline is handed back on CPU, in float32, without progress bars."""
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dpm_solver() -> DPMSolverMultistepScheduler:
    """The DPM-Solver++ (2nd order) scheduler PixArt and DiT are run with, on the SD beta schedule."""
    return DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


def _pixart_transformer(seed: int, **config) -> PixArtTransformer2DModel:
    """PixArt's transformer (self-attention, then cross-attention to T5 tokens, AdaLN-single)."""
    with seeded(seed):
        return PixArtTransformer2DModel(
            num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=HIDDEN, caption_channels=HIDDEN, sample_size=16, patch_size=2,
            norm_type="ada_norm_single", num_embeds_ada_norm=1000, norm_elementwise_affine=False,
            norm_eps=1e-6, attention_bias=True, activation_fn="gelu-approximate", **config,
        ).eval()


def build_pixart_alpha(seed: int = 0) -> PixArtAlphaPipeline:
    """PixArt-alpha: T5 (120 tokens) + learned-sigma transformer, DPM-Solver, SD VAE (4 channels)."""
    return _ready(PixArtAlphaPipeline(
        tokenizer=t5_tokenizer(120), text_encoder=t5_encoder(seed + 2, d_model=HIDDEN),
        vae=tiny_vae(seed + 1, scale_factor=2), transformer=_pixart_transformer(seed), scheduler=_dpm_solver(),
    ))


def build_pixart_sigma(seed: int = 0) -> PixArtSigmaPipeline:
    """PixArt-sigma: as alpha, with 300 T5 tokens, interpolation scale 2 and the SDXL VAE's scaling."""
    return _ready(PixArtSigmaPipeline(
        tokenizer=t5_tokenizer(300), text_encoder=t5_encoder(seed + 2, d_model=HIDDEN),
        vae=tiny_vae(seed + 1, scale_factor=2, scaling_factor=0.13025),
        transformer=_pixart_transformer(seed, interpolation_scale=2), scheduler=_dpm_solver(),
    ))


def build_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3-medium: MMDiT joint attention; CLIP-L/G (pooled, concatenated) + T5 (256 tokens) text."""
    # Both CLIPs' hidden states are concatenated and zero-padded to T5's width, the joint attention dim
    # (768 + 1280 -> 4096 in SD3); here 32 + 32 = 64. Their pooled outputs are concatenated likewise.
    with seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=2 * HIDDEN,
            caption_projection_dim=HIDDEN, pooled_projection_dim=2 * HIDDEN, pos_embed_max_size=32,
        ).eval()
    return _ready(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(seed + 1, scale_factor=2, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=clip_text_encoder(seed + 2, projection_dim=HIDDEN), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_text_encoder(seed + 3, projection_dim=HIDDEN), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(seed + 4, d_model=2 * HIDDEN), tokenizer_3=t5_tokenizer(256),
    ))


def build_flux(seed: int = 0) -> FluxPipeline:
    """FLUX.1-dev: double-stream (joint) then single-stream blocks, guidance-distilled (no CFG batch)."""
    with seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=HIDDEN, pooled_projection_dim=HIDDEN,
            guidance_embeds=True, axes_dims_rope=(4, 6, 6),
        ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's resolution-dependent shift
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return _ready(FluxPipeline(
        transformer=transformer, scheduler=scheduler,
        vae=tiny_vae(seed + 1, scale_factor=2, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=clip_text_encoder(seed + 2), tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder(seed + 3, d_model=HIDDEN), tokenizer_2=t5_tokenizer(512),
    ))


def build_hunyuan_dit(seed: int = 0) -> HunyuanDiTPipeline:
    """HunyuanDiT v1.2: BERT (77 tokens) + mT5 (256) cross-attention, long skips, DDPM v-prediction.

    The pipeline builds its rotary grid from ``height // 8``, so the VAE downscales by 8 (128 px -> 16x16).
    """
    with seeded(seed):
        transformer = HunyuanDiT2DModel(
            num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, hidden_size=HIDDEN, in_channels=4,
            patch_size=2, sample_size=16, num_layers=2, cross_attention_dim=HIDDEN, cross_attention_dim_t5=HIDDEN,
            pooled_projection_dim=16, text_len=77, text_len_t5=256, use_style_cond_and_image_meta_size=False,
        ).eval()
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.03, prediction_type="v_prediction",
        clip_sample=False, steps_offset=1,
    )
    return _ready(HunyuanDiTPipeline(
        transformer=transformer, scheduler=scheduler, vae=tiny_vae(seed + 1, scale_factor=8, scaling_factor=0.13025),
        text_encoder=bert_encoder(seed + 2), tokenizer=bert_tokenizer(77),
        text_encoder_2=t5_encoder(seed + 3, d_model=HIDDEN), tokenizer_2=t5_tokenizer(256),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ))


def build_dit(seed: int = 0) -> DiTPipeline:
    """DiT-XL/2 (class-conditional, adaLN-zero, self-attention only), called with ``class_labels``.

    ``num_embeds_ada_norm`` stays 1000: the label table then has the extra CFG row the pipeline's null
    class id 1000 looks up. The resolution is fixed by ``sample_size`` (16 latent -> 32 px).
    """
    with seeded(seed):
        transformer = DiTTransformer2DModel(
            num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=2,
            sample_size=16, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        ).eval()
    return _ready(DiTPipeline(transformer=transformer, vae=tiny_vae(seed + 1, scale_factor=2),
                              scheduler=_dpm_solver()))


def _dc_autoencoder(seed: int) -> AutoencoderDC:
    """A 3-stage deep-compression autoencoder (Sana's VAE class): 4x downscale, 4 latent channels."""
    with seeded(seed):
        return AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=2,
            encoder_block_types="ResBlock", decoder_block_types="ResBlock",
            encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
            encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
            encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()),
            downsample_block_type="conv", upsample_block_type="interpolate", scaling_factor=0.41407,
        ).eval()


def _light_gemma2(seed: int) -> Gemma2Model:
    """Like ``gemma2_encoder`` but with 2 query / 1 KV heads, for Sana.

    Sana prepends a ~1.1k-character instruction (one token per character here), and Gemma2 always runs
    eager soft-capped attention; with four heads that encoding alone took ~0.5 s of a tiny run.
    """
    config = Gemma2Config(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=HEAD_DIM, max_position_embeddings=256,
        sliding_window=64, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    with seeded(seed):
        return Gemma2Model(config).eval()


def build_sana(seed: int = 0) -> SanaPipeline:
    """Sana: linear self-attention + softmax cross-attention to Gemma2 tokens, flow DPM-Solver.

    The real prompt path is kept: the long "complex human instruction" is prepended and 300 tokens kept.
    """
    with seeded(seed):
        transformer = SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=2,
            num_cross_attention_heads=HEADS, cross_attention_head_dim=HEAD_DIM, cross_attention_dim=HIDDEN,
            caption_channels=HIDDEN, sample_size=8, patch_size=1,
        ).eval()
    scheduler = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, beta_schedule="linear",
    )
    return _ready(SanaPipeline(
        tokenizer=gemma_tokenizer(2048), text_encoder=_light_gemma2(seed + 2),
        vae=_dc_autoencoder(seed + 1), transformer=transformer, scheduler=scheduler,
    ))


def build_auraflow(seed: int = 0) -> AuraFlowPipeline:
    """AuraFlow: MMDiT joint blocks then single-stream blocks with register tokens; UMT5 (256) text."""
    with seeded(seed):
        transformer = AuraFlowTransformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_mmdit_layers=2,
            num_single_dit_layers=2, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
            caption_projection_dim=HIDDEN, joint_attention_dim=HIDDEN, pos_embed_max_size=256,
        ).eval()
    return _ready(AuraFlowPipeline(
        tokenizer=t5_tokenizer(256), text_encoder=t5_encoder(seed + 2, d_model=HIDDEN, umt5=True),
        vae=tiny_vae(seed + 1, scale_factor=2, scaling_factor=0.13025), transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.73),
    ))


def build_lumina2(seed: int = 0) -> Lumina2Pipeline:
    """Lumina-Image-2.0: unified single-stream attention over [caption; image], Gemma2 text, Flux VAE.

    The pipeline hard-codes a VAE scale factor of 8, so the VAE downscales by 8 (128 px -> 16x16 latent).
    """
    with seeded(seed):
        transformer = Lumina2Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, hidden_size=HIDDEN, num_layers=2, num_refiner_layers=1,
            num_attention_heads=HEADS, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6),
            cap_feat_dim=HIDDEN,
        ).eval()
    return _ready(Lumina2Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0),
        vae=tiny_vae(seed + 1, scale_factor=8, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=gemma2_encoder(seed + 2, hidden=HIDDEN), tokenizer=gemma_tokenizer(256),
    ))
