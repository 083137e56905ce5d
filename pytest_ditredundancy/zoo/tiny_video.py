"""Tiny offline twins of the video DiT pipelines: CogVideoX, Latte, Mochi, Wan 2.1 and LTX-Video.

Each builder returns the real diffusers pipeline class wired to small, randomly initialised components
(transformer, video VAE, T5/UMT5 encoder, in-memory tokenizer) and the scheduler the real checkpoint ships
with, so the pipeline's own ``__call__`` (guidance batching, latent packing, decode) runs unchanged on a CPU.

Weights come from ``seeded(seed + k)`` per component (transformer 0, VAE 1, text encoder 2), so the same
seed always gives bit-identical pipelines. Each VAE matches the compression ratios its pipeline reads and the
real temporal ratio, but has fewer spatial stages (Mochi's pipeline hard-codes 8x: there the transformer patch
shrinks instead), so the tiny catalog sizes still give several video tokens per frame, not one.
"""

from __future__ import annotations

from .tiny_parts import seeded, t5_encoder, t5_tokenizer

#: Hidden size of every tiny text encoder; transformers project captions from this width.
TEXT_DIM = 32


def _finish(pipe):
    """CPU, float32, no progress bars: the state every tiny pipeline is handed back in."""
    pipe = pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text(seed: int, max_length: int, umt5: bool = False):
    """Tokenizer sized to the pipeline's default ``max_sequence_length`` and a seeded T5/UMT5 encoder."""
    return t5_tokenizer(model_max_length=max_length), t5_encoder(seed + 2, d_model=TEXT_DIM, umt5=umt5)


# --- video VAEs ----------------------------------------------------------------------------------------


def _cogvideox_vae(seed: int, latent_channels: int):
    """3 stages: 4x spatial, and both downsamples also compress time, giving CogVideoX's 4x temporal ratio."""
    from diffusers import AutoencoderKLCogVideoX

    with seeded(seed + 1):
        return AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, latent_channels=latent_channels,
            down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
            block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
        ).eval()


def _latte_vae(seed: int):
    """Latte decodes frame by frame with an image VAE; 2 stages give a 2x spatial factor."""
    from diffusers import AutoencoderKL

    with seeded(seed + 1):
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=2, sample_size=16,
        ).eval()


def _mochi_vae(seed: int):
    """MochiPipeline hard-codes 8x spatial / 6x temporal and 12 latent channels, so the stages keep those.

    Widths stay at 32 because its group norms always use 32 groups; attention blocks are dropped for speed.
    """
    from diffusers import AutoencoderKLMochi

    with seeded(seed + 1):
        return AutoencoderKLMochi(
            latent_channels=12, out_channels=3, encoder_block_out_channels=(32,) * 4,
            decoder_block_out_channels=(32,) * 4, layers_per_block=(1,) * 5, add_attention_block=(False,) * 5,
        ).eval()


def _wan_vae(seed: int):
    """2 stages, both temporal: 4x spatial and Wan's 4x temporal; the pipeline reads the ratios from config."""
    from diffusers import AutoencoderKLWan

    with seeded(seed + 1):
        return AutoencoderKLWan(
            base_dim=8, z_dim=16, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
            scale_factor_spatial=4, scale_factor_temporal=4,
        ).eval()


def _ltx_vae(seed: int):
    """Three space-time stages with no pixel patching: 8x spatial and LTX's 8x temporal ratio."""
    from diffusers import AutoencoderKLLTXVideo

    with seeded(seed + 1):
        vae = AutoencoderKLLTXVideo(
            latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
            layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
            spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False),
            patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
        ).eval()
    # Whole-clip decoding: the framewise path only matters for memory on long videos.
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    return vae


# --- pipelines -----------------------------------------------------------------------------------------


def build_cogvideox(seed: int = 0):
    """CogVideoX-5b style: rotary positions, joint text+video attention, v-prediction CogVideoX DPM sampler."""
    from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    with seeded(seed):
        # Head dim 16 so the 3D RoPE split (t=4, h=6, w=6) fills every channel.
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
            text_embed_dim=TEXT_DIM, num_layers=2, sample_width=4, sample_height=4, sample_frames=9,
            patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226,
            use_rotary_positional_embeddings=True,
        ).eval()
    scheduler = CogVideoXDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=1.0,
        timestep_spacing="trailing",
    )
    tokenizer, text_encoder = _text(seed, 226)
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_cogvideox_vae(seed, 4),
                             transformer=transformer, scheduler=scheduler)
    return _finish(pipe)


def build_latte(seed: int = 0):
    """Latte-1 style: alternating spatial (frames in batch) and temporal (pixels in batch) blocks, DDIM.

    ``video_length`` must equal the number of frames sampled (4 in the catalog): Latte adds a fixed-length
    temporal position table. Its output carries learned variance (8 channels), which the pipeline drops.
    """
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel

    with seeded(seed):
        transformer = LatteTransformer3DModel(
            sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=4,
            caption_channels=TEXT_DIM, in_channels=4, out_channels=8, cross_attention_dim=32,
            attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, video_length=4,
        ).eval()
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False,
                              prediction_type="epsilon")
    tokenizer, text_encoder = _text(seed, 120)
    pipe = LattePipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_latte_vae(seed),
                         transformer=transformer, scheduler=scheduler)
    return _finish(pipe)


def build_mochi(seed: int = 0):
    """Mochi-1 style: joint attention with text through separate add_q/add_k/add_v projections, flow matching.

    Patch size 1 (the real model uses 2) so the 2x2 latent of a 16x16 clip still gives 4 tokens per frame.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    with seeded(seed):
        transformer = MochiTransformer3DModel(
            patch_size=1, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
            in_channels=12, text_embed_dim=TEXT_DIM, time_embed_dim=16, max_sequence_length=256,
        ).eval()
        # Learned RoPE frequencies start at zero (identity rotation); give them seeded values like a trained model.
        transformer.pos_frequencies.data.normal_(0.0, 0.5)
    # Mochi-1's shipped scheduler inverts sigmas: its transformer reads t=0 as pure noise.
    scheduler = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    tokenizer, text_encoder = _text(seed, 256)
    pipe = MochiPipeline(scheduler=scheduler, vae=_mochi_vae(seed),
                         text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    return _finish(pipe)


def build_wan(seed: int = 0):
    """Wan2.1-T2V style: self-attention over all frames, text cross-attention, UniPC with flow sigmas.

    The pipeline runs the transformer twice per step (conditional, then unconditional) instead of a
    doubled batch.
    """
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    with seeded(seed):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    tokenizer, text_encoder = _text(seed, 512, umt5=True)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_wan_vae(seed),
                       scheduler=scheduler, transformer=transformer)
    return _finish(pipe)


def build_ltx(seed: int = 0):
    """LTX-Video style: packed token sequence, self + cross attention with RoPE, shifted flow-match Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    with seeded(seed):
        transformer = LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
            attention_head_dim=8, cross_attention_dim=32, num_layers=2, caption_channels=TEXT_DIM,
        ).eval()
    # LTX-Video's shipped scheduler settings (resolution-dependent shift).
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
        max_image_seq_len=4096, shift_terminal=0.1,
    )
    tokenizer, text_encoder = _text(seed, 128)
    pipe = LTXPipeline(scheduler=scheduler, vae=_ltx_vae(seed), text_encoder=text_encoder, tokenizer=tokenizer,
                       transformer=transformer)
    return _finish(pipe)
