"""Every real architecture at full scale: ``python -m benchmarks.real_scale --device cuda [--models a,b]
[--steps 4] [--budget-s 480] [--out PATH]``; ``--device cpu --quick`` is the dry run the tests use.

For the redundancy study's seven models (FLUX.1-dev, PixArt-α, SD3, CogVideoX-5b, Latte, Mochi, Open-Sora 1.2)
plus Wan2.1 and Sana, the real transformer is built from its shipped config (``zoo.real_configs``) on the meta
device, cast to the study's dtype, given memory on the target device with ``to_empty`` and initialised there
(weights N(0, 0.02), biases 0, norm scales 1, buffers 0: time and memory do not depend on the values). It is
then called directly — random latents and text embeddings of the study's size, frames and guidance rows, no
text encoder or VAE — for ``--steps`` plain steps and as many captured ones (``capture_redundancy`` on the
real capture sites, default options), each step synchronised and timed. Per model it reports plain and
captured seconds per step, the capture's extra peak memory (CUDA allocator; on CPU the bytes the capture
keeps) against the ``plan`` command's prediction for the same settings, and the host syncs inside the
capture's callbacks (``fail_on_host_sync``: must be 0). The JSON (default ``benchmarks/out/real_scale.json``)
is rewritten after every model, and a model that would not fit in the time left (``--budget-s``) is skipped
and named. ``--quick`` shrinks every model (one block, two heads, 8 text tokens, a small size): it checks the
builders and the bookkeeping, not the speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "out" / "real_scale.json"
#: the study's seven models, then Wan2.1 and Sana
MODELS = ("flux-dev", "pixart-alpha", "sd3-medium", "cogvideox-5b", "latte-1", "mochi-1", "open-sora-1.2", "wan2.1",
          "sana")
#: --quick: config keys that make each transformer one small block (heads keep their width)
QUICK_CONFIG: dict[str, dict[str, Any]] = {
    "FluxTransformer2DModel": {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2},
    "PixArtTransformer2DModel": {"num_layers": 1, "num_attention_heads": 2, "cross_attention_dim": 144},
    "SD3Transformer2DModel": {"num_layers": 1, "num_attention_heads": 2, "caption_projection_dim": 128},
    "CogVideoXTransformer3DModel": {"num_layers": 1, "num_attention_heads": 2},
    "LatteTransformer3DModel": {"num_layers": 1, "num_attention_heads": 2, "cross_attention_dim": 144},
    "MochiTransformer3DModel": {"num_layers": 1, "num_attention_heads": 2},
    "WanTransformer3DModel": {"num_layers": 1, "num_attention_heads": 2, "ffn_dim": 256},
    "SanaTransformer2DModel": {"num_layers": 1, "num_attention_heads": 7, "num_cross_attention_heads": 2,
                               "cross_attention_dim": 224},
    "STDiT3": {"depth": 1, "hidden_size": 128, "num_heads": 2},
}
QUICK_SIZE = {"height": 64, "width": 64, "text_tokens": 8}


@dataclasses.dataclass(frozen=True)
class Setting:
    """What one model runs at: the study's size, frames, dtype and guidance rows."""

    name: str
    height: int
    width: int
    frames: int | None
    dtype: str
    rows: int  # per transformer call
    calls: int  # transformer calls per step


def setting_of(name: str, quick: bool) -> Setting:
    from pytest_ditredundancy.profiling.capture_plan import _rows_and_calls
    from pytest_ditredundancy.profiling.paper import PAPER_SETUPS
    from pytest_ditredundancy.zoo.registry import get_spec

    spec = get_spec(name)
    study = PAPER_SETUPS.get(spec.family)
    height, width = (study.height, study.width) if study else (spec.height, spec.width)
    frames = study.num_frames if study else spec.num_frames
    dtype = study.dtype if study else spec.dtype
    rows, calls = _rows_and_calls(spec, 1)
    if quick:
        height, width, dtype = QUICK_SIZE["height"], QUICK_SIZE["width"], "float32"  # the study's frames
    return Setting(name, height, width, frames, dtype, rows, calls)


def real_config(name: str, quick: bool):
    from pytest_ditredundancy.zoo.real_configs import load_real_config

    real = load_real_config(name)
    if not quick:
        return real
    config = {**real.config, **QUICK_CONFIG[real.transformer_class]}
    geometry = dataclasses.replace(real.geometry, text_tokens=QUICK_SIZE["text_tokens"])
    if real.transformer_class == "STDiT3":
        config["model_max_length"] = QUICK_SIZE["text_tokens"]
    return dataclasses.replace(real, config=config, geometry=geometry)


def build(real, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Meta device, cast, ``to_empty`` on ``device``, initialised in place (no host copy of the weights)."""
    from pytest_ditredundancy.zoo.real_configs import build_on_meta

    model = build_on_meta(real).to(dtype).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.02, generator=generator)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.fill_(1.0)
        for buffer in model.buffers():
            buffer.zero_()
    return model.eval()


def inputs(real, setting: Setting, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments of one transformer call: latents, text embeddings and timestep of the right shapes."""
    config, geometry, rows = real.config, real.geometry, setting.rows
    text = geometry.text_tokens
    frames = geometry.latent_frames(setting.frames)
    generator = torch.Generator(device).manual_seed(1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    cls = real.transformer_class
    patch = config.get("patch_size", 1)
    patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
    vae = geometry.spatial_factor // (2 if cls == "FluxTransformer2DModel" else patch)
    h, w = setting.height // vae, setting.width // vae
    steps = torch.full((rows,), 500, device=device)
    if cls == "FluxTransformer2DModel":
        tokens = (h // 2) * (w // 2)
        args = {"hidden_states": rand(rows, tokens, config["in_channels"]),
                "encoder_hidden_states": rand(rows, text, config["joint_attention_dim"]),
                "pooled_projections": rand(rows, config["pooled_projection_dim"]), "timestep": steps / 1000,
                "img_ids": torch.zeros(tokens, 3, device=device), "txt_ids": torch.zeros(text, 3, device=device)}
        if config.get("guidance_embeds"):
            args["guidance"] = torch.full((rows,), 3.5, device=device)
        return args
    if cls == "STDiT3":
        return {"x": rand(rows, config["in_channels"], frames, h, w), "timestep": steps.float(),
                "y": rand(rows, 1, text, config["caption_channels"]),
                "mask": torch.ones(rows, text, dtype=torch.long, device=device)}
    channels = config["in_channels"]
    latent = {"PixArtTransformer2DModel": (channels, h, w), "SD3Transformer2DModel": (channels, h, w),
              "SanaTransformer2DModel": (channels, h, w), "CogVideoXTransformer3DModel": (frames, channels, h, w),
              "LatteTransformer3DModel": (channels, frames, h, w),
              "MochiTransformer3DModel": (channels, frames, h, w), "WanTransformer3DModel": (channels, frames, h, w)}
    width = {"PixArtTransformer2DModel": "caption_channels", "SD3Transformer2DModel": "joint_attention_dim",
             "SanaTransformer2DModel": "caption_channels", "CogVideoXTransformer3DModel": "text_embed_dim",
             "LatteTransformer3DModel": "caption_channels", "MochiTransformer3DModel": "text_embed_dim",
             "WanTransformer3DModel": "text_dim"}
    args = {"hidden_states": rand(rows, *latent[cls]), "encoder_hidden_states": rand(rows, text, config[width[cls]]),
            "timestep": steps}
    if cls == "PixArtTransformer2DModel":
        size = torch.tensor([[setting.height, setting.width]], device=device, dtype=dtype).repeat(rows, 1)
        args["added_cond_kwargs"] = {"resolution": size, "aspect_ratio": size[:, :1] / size[:, 1:]}
    if cls == "SD3Transformer2DModel":
        args["pooled_projections"] = rand(rows, config["pooled_projection_dim"])
    if cls == "MochiTransformer3DModel":
        args["encoder_attention_mask"] = torch.ones(rows, text, dtype=torch.bool, device=device)
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def denoise(model: nn.Module, args: dict[str, Any], setting: Setting, steps: int, device: torch.device,
            cap: Any = None) -> list[float]:
    """``steps`` steps of ``setting.calls`` transformer calls each; seconds per step (synchronised)."""
    key = "x" if "x" in args else "hidden_states"
    latents = args[key]
    seconds = []
    with torch.no_grad():
        for step in range(steps):
            started = time.perf_counter()
            for _ in range(setting.calls):
                out = model(**{**args, key: latents})
            out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
            if out.shape == latents.shape:  # a stand-in for the scheduler: the next step's input moves a little
                latents = (0.9 * latents.float() + 0.1 * out.float()).to(latents.dtype)
            if cap is not None:
                cap.end_step(step)
            synchronize(device)
            seconds.append(time.perf_counter() - started)
    return seconds


def peak_of(device: torch.device, run: Callable[[], Any]) -> tuple[int, Any]:
    """Peak bytes allocated above the starting point while ``run`` runs (CUDA; 0 elsewhere)."""
    if device.type != "cuda":
        return 0, run()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = run()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base, result


def measure(name: str, device: torch.device, steps: int, quick: bool, log, memory: str | None = None) -> dict[str, Any]:
    from pytest_ditredundancy import capture_redundancy
    from pytest_ditredundancy.profiling.capture_plan import plan_capture
    from pytest_ditredundancy.zoo.real_configs import real_sites
    from pytest_ditredundancy.zoo.registry import get_spec

    started = time.perf_counter()
    setting, real = setting_of(name, quick), real_config(name, quick)
    dtype = getattr(torch, setting.dtype)
    model = build(real, device, dtype)
    args = inputs(real, setting, device, dtype)
    sites = real_sites(real, model)
    plan = plan_capture(name, height=setting.height, width=setting.width, num_frames=setting.frames,
                        dtype=setting.dtype, real=real)
    layout = "single" if setting.rows == 1 and setting.calls == 1 else get_spec(name).branch_layout
    row: dict[str, Any] = {"model": name, "class": real.transformer_class, **dataclasses.asdict(setting),
                           "parameters": plan.parameters, "sites": len(sites), "image_tokens": plan.image_tokens,
                           "text_tokens": plan.text_tokens, "build_seconds": time.perf_counter() - started}

    def capture():
        return capture_redundancy(model, sites=sites, branch_layout=layout, memory=memory)

    denoise(model, args, setting, 1, device)  # warm-up: kernels, allocator
    with capture() as warm:
        denoise(model, args, setting, 3, device, warm)  # compiles the call kernel (compilation may sync)
    row["stats"] = {**warm.step_statistics.summary(), "memory": warm.memory.chosen, "memory_reason": warm.memory.reason,
                    "call_kernels": warm.batch.launches,
                    "compile_seconds": warm.batch.compile_seconds + warm.step_statistics.compile_seconds}
    del warm
    plain_peak, plain = peak_of(device, lambda: denoise(model, args, setting, steps, device))
    cap = capture()
    if device.type == "cuda":
        cap.fail_on_host_sync()

    def captured_run() -> list[float]:
        with cap:
            return denoise(model, args, setting, steps, device, cap)

    try:
        captured_peak, captured = peak_of(device, captured_run)
        row["host_syncs"] = 0 if device.type == "cuda" else "not checked (CPU)"
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):
            raise
        row["host_syncs"], row["host_sync_error"] = ">= 1", str(exc).splitlines()[0][:300]
        return row
    held = cap.held_bytes()["kept"]
    chosen = cap.memory.chosen
    predicted = plan.held_bytes + (plan.call_bytes if chosen == "fast" else plan.transient_bytes(
        "fused" if cap.step_statistics.calls["fused"] else "eager"))
    measured = captured_peak - plain_peak if device.type == "cuda" else held
    if device.type != "cuda":
        predicted = plan.held_bytes  # without allocator statistics: the bytes kept between steps
    plain_step, captured_step = statistics.median(plain[1:]), statistics.median(captured[1:])
    row.update(plain_seconds_per_step=plain_step, captured_seconds_per_step=captured_step,
               overhead=captured_step / plain_step, memory_mode=chosen,
               memory={"measured": measured, "predicted": predicted, "ratio": measured / predicted if predicted else
                       math.nan, "kind": "extra CUDA peak" if device.type == "cuda" else "bytes kept",
                       "held_measured": held, "held_predicted": plan.held_bytes,
                       "plain_peak": plain_peak, "captured_peak": captured_peak},
               profile_ok=bool(torch.isfinite(torch.as_tensor(cap.profile(model=name).values["abs_l1"])).any()),
               seconds=time.perf_counter() - started)
    log(f"  {name}: plain {plain_step * 1e3:.1f} ms/step, captured {captured_step * 1e3:.1f} ms/step "
        f"({row['overhead']:.3f}x); memory {chosen}: measured {measured / 2**20:.1f} MiB vs plan "
        f"{predicted / 2**20:.1f} MiB ({row['memory']['ratio']:.3f}); host syncs {row['host_syncs']}")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: the dry run)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list (default: {','.join(MODELS)})")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode (default 4; the first is dropped)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-time budget; models that would not "
                        "fit in what is left are skipped and named (default 480)")
    parser.add_argument("--memory", choices=("auto", "fast", "low"), default=None,
                        help="the capture's memory mode (default: the capture's default, auto)")
    parser.add_argument("--quick", action="store_true", help="every model shrunk to one small block")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU (use --device cpu --quick for the dry run)")
    if device.type == "cpu" and not args.quick:
        parser.error("full-scale models do not run on a CPU: add --quick for the dry run")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is dropped from the medians)")
    models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"unknown model(s) {unknown}: choose from {', '.join(MODELS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    report: dict[str, Any] = {"device": str(device), "quick": args.quick, "steps": args.steps, "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                              "models": [], "skipped": []}
    slowest = 0.0
    for name in models:
        left = args.budget_s - (time.perf_counter() - started)
        if left < max(30.0, 1.2 * slowest):
            report["skipped"].append({"model": name, "reason": f"{left:.0f} s of the budget left"})
            log(f"  {name}: skipped ({left:.0f} s of the budget left)")
            continue
        log(f"{name}: building and running ({left:.0f} s left)")
        try:
            row = measure(name, device, args.steps, args.quick, log, args.memory)
        except torch.OutOfMemoryError as exc:
            row = {"model": name, "error": f"out of memory: {str(exc).splitlines()[0][:300]}"}
        slowest = max(slowest, row.get("seconds", 0.0))
        report["models"].append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["wall_seconds"] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"{'model':<15} {'dtype':<9} {'size':<14} {'plain ms':>9} {'capt. ms':>9} {'ratio':>6} {'memory':>6} "
          f"{'measured MiB':>13} {'plan MiB':>9} {'ratio':>6} {'syncs':>5}")
    for row in report["models"]:
        if "error" in row or "overhead" not in row:
            print(f"{row['model']:<15} {row.get('error') or row.get('host_sync_error')}")
            continue
        size = f"{row['width']}x{row['height']}" + (f"x{row['frames']}" if row["frames"] else "")
        mem = row["memory"]
        print(f"{row['model']:<15} {row['dtype']:<9} {size:<14} {row['plain_seconds_per_step'] * 1e3:>9.1f} "
              f"{row['captured_seconds_per_step'] * 1e3:>9.1f} {row['overhead']:>6.3f} {row['memory_mode']:>6} "
              f"{mem['measured'] / 2**20:>13.1f} {mem['predicted'] / 2**20:>9.1f} {mem['ratio']:>6.3f} "
              f"{row['host_syncs']!s:>5}")
    for skipped in report["skipped"]:
        print(f"{skipped['model']:<15} skipped: {skipped['reason']}")
    report["wall_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    log(f"wrote {args.out} ({report['wall_seconds']:.0f} s)")
    return 0 if all("overhead" in row for row in report["models"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
