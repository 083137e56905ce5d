"""An independent re-implementation of the redundancy study's measurement (arXiv 2411.13588), for parity tests.

The study replaced the attention processors of its models with processors that, on every call, record K, V and
A and append ``mean|X_t - X_{t-1}|`` over the whole tensor (the whole transformer batch: both guidance halves)
to a per-layer list; it ran one caption per pipeline call with the same generator seed, and read the lists
after each caption. This module does the same, written from the study's definitions for the diffusers version
installed here, and shares no code with the package's capture (no hooks, no sites, no streaming statistics):

* one processor per attention family, doing the model's own arithmetic (that of the diffusers processor it
  replaces, so the sample is bit-identical) and recording the study's tensors where the study recorded them:
  PixArt-α/Latte ``attn1`` (``to_k``/``to_v`` outputs, the module output), SD3 joint attention (image
  ``to_k``/``to_v``/``to_out``), FLUX (K after ``norm_k`` and RoPE, of the image tokens in double blocks and of
  the joint sequence in single blocks), CogVideoX (video tokens, K after ``norm_k`` and RoPE), Mochi (video
  tokens, K after ``norm_k`` and RoPE, A before the output projection), Open-Sora's STDiT ``attn`` (K after
  ``k_norm`` and RoPE, A after ``proj``);
* the settings are the study's, written here again (steps, guidance, seed), not read from the package.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

#: the study's settings per family (from its scripts): steps, guidance, the seed of every caption; which blocks
#: (ModuleList names, in the study's order) and which attention attribute it measured. Tiny twins keep their size.
STUDY = {
    "flux": dict(steps=28, guidance=3.5, seed=42, blocks=("transformer_blocks", "single_transformer_blocks"), attn="attn"),
    "pixart-alpha": dict(steps=20, guidance=4.5, seed=42, blocks=("transformer_blocks",), attn="attn1"),
    "sd3": dict(steps=28, guidance=7.0, seed=42, blocks=("transformer_blocks",), attn="attn"),
    "cogvideox": dict(steps=50, guidance=6.0, seed=42, blocks=("transformer_blocks",), attn="attn1"),
    "latte": dict(steps=50, guidance=7.5, seed=42, blocks=("transformer_blocks", "temporal_transformer_blocks"),
                  attn="attn1"),
    "mochi": dict(steps=64, guidance=4.5, seed=1710977262, blocks=("transformer_blocks",), attn="attn1"),
    "open-sora": dict(steps=30, guidance=7.0, seed=1024, blocks=("spatial_blocks", "temporal_blocks"), attn="attn"),
}


class Record:
    """The study's ``update_cache``: the previous call's tensor per key, and mean|X_t - X_{t-1}| per later call."""

    def __init__(self) -> None:
        self.previous: dict[str, torch.Tensor] = {}
        self.means: dict[str, list[float]] = {"k": [], "v": [], "a": []}

    def __call__(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().to(torch.float32).clone()
        if key in self.previous:
            self.means[key].append(torch.mean(torch.abs(value - self.previous[key])).item())
        self.previous[key] = value


def split_heads(attn, batch: int, query, key, value, norms=None):
    """``(B, S, C)`` projections to ``(B, H, S, D)`` with q/k norms, as diffusers' processors do: ``norms`` is
    ``(norm_q, norm_k)``, the attention's own by default (a joint block's text stream passes its ``norm_added_*``);
    also returns ``D``."""
    norm_q, norm_k = norms if norms is not None else (attn.norm_q, attn.norm_k)
    head = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head).transpose(1, 2) for t in (query, key, value))
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value, head


class SelfAttention:
    """PixArt-α / Latte ``attn1`` (diffusers' ``AttnProcessor2_0`` arithmetic, self-attention on 3-D states)."""

    def __init__(self) -> None:
        self.record = Record()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert encoder_hidden_states is None and hidden_states.ndim == 3 and attn.spatial_norm is None
        assert attn.group_norm is None
        residual = hidden_states
        batch, length, _ = hidden_states.shape
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        self.record("k", key)
        self.record("v", value)
        query, key, value, head = split_heads(attn, batch, query, key, value)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        self.record("a", out)
        return out


class JointAttention:
    """SD3 MMDiT joint attention (``JointAttnProcessor2_0`` arithmetic; sequence ``[image, text]``)."""

    def __init__(self) -> None:
        self.record = Record()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        batch, image_length = hidden_states.shape[0], hidden_states.shape[1]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        self.record("k", key)
        self.record("v", value)
        query, key, value, head = split_heads(attn, batch, query, key, value)
        if encoder_hidden_states is not None:
            text = (p(encoder_hidden_states) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            text_q, text_k, text_v, _ = split_heads(attn, batch, *text, norms=(attn.norm_added_q, attn.norm_added_k))
            query, key, value = (torch.cat([a, b], dim=2) for a, b in ((query, text_q), (key, text_k), (value, text_v)))
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head).to(query.dtype)
        image, text = out[:, :image_length], out[:, image_length:]
        image = attn.to_out[1](attn.to_out[0](image))
        self.record("a", image)
        if encoder_hidden_states is None:
            return image
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text


class FluxJointAttention:
    """FLUX double and single blocks (``FluxAttnProcessor`` arithmetic; sequence ``[text, image]``)."""

    def __init__(self) -> None:
        self.record = Record()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        query, key, value = (p(hidden_states).unflatten(-1, (-1, attn.head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        text_length = 0
        if encoder_hidden_states is not None:
            text_q, text_k, text_v = (p(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
                                      for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
            text_length = text_q.shape[1]
            query, key, value = (torch.cat([a, b], dim=1) for a, b in ((text_q, query), (text_k, key), (text_v, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        self.record("k", key[:, text_length:])
        self.record("v", value[:, text_length:])
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            self.record("a", out)
            return out
        text, image = out.split_with_sizes([text_length, out.shape[1] - text_length], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        self.record("a", image)
        return image, attn.to_add_out(text.contiguous())


class CogVideoXAttention:
    """CogVideoX ``attn1`` (``CogVideoXAttnProcessor2_0`` arithmetic; sequence ``[text, video]``)."""

    def __init__(self) -> None:
        self.record = Record()

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        assert attention_mask is None
        text_length = encoder_hidden_states.size(1)
        states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch = states.shape[0]
        query, key, value = attn.to_q(states), attn.to_k(states), attn.to_v(states)
        query, key, value, head = split_heads(attn, batch, query, key, value)
        if image_rotary_emb is not None:
            query[:, :, text_length:] = apply_rotary_emb(query[:, :, text_length:], image_rotary_emb)
            key[:, :, text_length:] = apply_rotary_emb(key[:, :, text_length:], image_rotary_emb)
        self.record("k", key[:, :, text_length:])
        self.record("v", value[:, :, text_length:])
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head)
        out = attn.to_out[1](attn.to_out[0](out))
        text, video = out.split([text_length, out.size(1) - text_length], dim=1)
        self.record("a", video)
        return video, text


class MochiAttention:
    """Mochi ``attn1`` (``MochiAttnProcessor2_0`` arithmetic: per-sample attention over video + valid text)."""

    def __init__(self) -> None:
        self.record = Record()

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        def rotate(x, cos, sin):
            even, odd = x[..., 0::2].float(), x[..., 1::2].float()
            return torch.stack([(even * cos - odd * sin).to(x.dtype), (even * sin + odd * cos).to(x.dtype)], -1).flatten(-2)

        query, key, value = (p(hidden_states).unflatten(2, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_q, text_k, text_v = (p(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                                  for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        if image_rotary_emb is not None:
            query, key = rotate(query, *image_rotary_emb), rotate(key, *image_rotary_emb)
        self.record("k", key)
        self.record("v", value)
        query, key, value, text_q, text_k, text_v = (t.transpose(1, 2) for t in (query, key, value, text_q, text_k, text_v))
        video_length, text_length = query.size(2), text_q.size(2)
        outputs = []
        for i in range(query.shape[0]):
            valid = torch.nonzero(attention_mask[i][None, :].flatten(), as_tuple=False).flatten()
            q = torch.cat([query[i:i + 1], text_q[i:i + 1, :, valid]], dim=2)
            k = torch.cat([key[i:i + 1], text_k[i:i + 1, :, valid]], dim=2)
            v = torch.cat([value[i:i + 1], text_v[i:i + 1, :, valid]], dim=2)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
            outputs.append(F.pad(out, (0, 0, 0, video_length + text_length - out.size(2))))
        out = torch.cat(outputs, dim=0).transpose(1, 2).flatten(2, 3)
        video, text = out.split_with_sizes((video_length, text_length), dim=1)
        self.record("a", video)
        video = attn.to_out[1](attn.to_out[0](video))
        if hasattr(attn, "to_add_out"):
            text = attn.to_add_out(text)
        return video, text


def _stdit_forward(attn, record: Record):
    """Open-Sora's STDiT ``Attention.forward`` (the tiny twin's arithmetic) with the study's records."""

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = self.rotary_emb(q), self.rotary_emb(k)
        record("k", k)
        record("v", v)
        out = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        record("a", out)
        return out

    return types.MethodType(forward, attn)


PROCESSORS = {"pixart-alpha": SelfAttention, "latte": SelfAttention, "sd3": JointAttention, "flux": FluxJointAttention,
              "cogvideox": CogVideoXAttention, "mochi": MochiAttention}


def study_layers(transformer, family: str) -> list[tuple[str, Any]]:
    study = STUDY[family]
    return [(f"{blocks}.{i}.{study['attn']}", getattr(block, study["attn"]))
            for blocks in study["blocks"] for i, block in enumerate(getattr(transformer, blocks))]


def _set_processor(attn, processor) -> None:
    if hasattr(attn, "set_processor"):
        attn.set_processor(processor)
    else:  # MochiAttention keeps a plain attribute
        attn.processor = processor


@contextmanager
def study_processors(transformer, family: str) -> Iterator[dict[str, Record]]:
    """Install the study's recording processors on the measured layers; yields ``{layer: Record}``, kept fresh per
    caption by :func:`reset`. Everything is restored on exit."""
    layers = study_layers(transformer, family)
    records: dict[str, Record] = {}
    restore = []
    try:
        for name, attn in layers:
            if family == "open-sora":
                records[name] = Record()
                attn.forward = _stdit_forward(attn, records[name])
                restore.append(lambda attn=attn: delattr(attn, "forward"))
            else:
                original = attn.processor
                processor = PROCESSORS[family]()
                records[name] = processor.record
                _set_processor(attn, processor)
                restore.append(lambda attn=attn, original=original: _set_processor(attn, original))
        yield records
    finally:
        for undo in restore:
            undo()


def reset(records: dict[str, Record]) -> None:
    """Clear every layer's record between captions (the study's ``reset_cache``), in place."""
    for record in records.values():
        record.previous.clear()
        for values in record.means.values():
            values.clear()


def study_profile(pipe, family: str, prompts: list[str], *, size: dict[str, int], call_kwargs: dict[str, Any],
                  frames_argument: str = "num_frames") -> tuple[dict[str, np.ndarray], list[str], list[torch.Tensor]]:
    """Run every caption in its own call with the study's seed and settings; ``(values, layers, latents)`` with
    ``values[kind]`` of shape ``[prompt, layer, step_pair]`` and each caption's final latents."""
    study = STUDY[family]
    transformer = pipe.transformer
    names = [name for name, _ in study_layers(transformer, family)]
    values = {kind: [] for kind in ("k", "v", "a")}
    latents = []
    with study_processors(transformer, family) as records:
        for prompt in prompts:
            reset(records)
            generator = torch.Generator("cpu").manual_seed(study["seed"])
            if family == "open-sora":
                out = pipe.run([prompt], num_inference_steps=study["steps"], guidance_scale=study["guidance"],
                               generators=[generator], use_timestep_transform=True, aes=6.5, **size)
            else:
                frames = {frames_argument: size["num_frames"]} if size.get("num_frames") else {}
                out = pipe(prompt=prompt, generator=generator, num_inference_steps=study["steps"],
                           guidance_scale=study["guidance"], height=size["height"], width=size["width"],
                           output_type="latent", **frames, **call_kwargs)
                out = out[0] if isinstance(out, tuple) else getattr(out, "images", getattr(out, "frames", out))
            latents.append(torch.as_tensor(out).clone())
            for kind in values:
                values[kind].append([list(records[name].means[kind]) for name in names])
    return {kind: np.asarray(v, dtype=np.float64) for kind, v in values.items()}, names, latents
