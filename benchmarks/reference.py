"""The reference approach the benchmark compares against, in the style of the paper's tool DiTCacheAnalysis.

DiTCacheAnalysis (the code behind "Unveiling Redundancy in Diffusion Transformers", arXiv 2411.13588) swaps
each attention module's processor for a copy of diffusers' ``AttnProcessor2_0`` with recording calls inserted
after the K/V projections, and computes ``mean|X_t - X_{t-1}|`` per tensor with ``.item()``. Here the
processor keeps only the previous step's K, V and A per attention module (the original keeps every step on
the host, which would only make it slower) and computes the same three distances the package reports (so
both sides deliver equal results), turning each into a Python float at once: every distance of every
captured tensor costs one host synchronisation per step. Written for comparison only; it is not part of the
package and supports what the benchmark model needs (3-D hidden states, no spatial or group norm).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceAttnProcessor:
    """``AttnProcessor2_0`` (diffusers 0.42) plus per-step ``abs_l1`` of K, V and A with ``.item()``."""

    def __init__(self, layer: str, store: "ReferenceCapture") -> None:
        self.layer = layer
        self.store = store
        self.previous: dict[str, torch.Tensor] = {}

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise NotImplementedError("the reference processor covers 3-D attention without spatial/group norm")
        residual = hidden_states
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        self._record("k", key)
        self._record("v", value)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        self._record("a", hidden_states)
        return hidden_states

    def _record(self, kind: str, tensor: torch.Tensor) -> None:
        """The same three distances the package reports, each the straightforward way with ``.item()``."""
        previous = self.previous.get(kind)
        if previous is not None:
            current, before = tensor.detach().float(), previous.float()
            change = (current - before).abs()
            delta = change.mean().item()  # one host sync per distance, per tensor, per step
            relative = (change.sum() / before.abs().sum()).item()
            cosine = 1.0 - F.cosine_similarity(current.flatten(), before.flatten(), dim=0).item()
            self.store.deltas.setdefault((self.layer, kind), []).append(delta)
            self.store.relative.setdefault((self.layer, kind), []).append(relative)
            self.store.cosine.setdefault((self.layer, kind), []).append(cosine)
        self.previous[kind] = tensor.detach()


class ReferenceCapture:
    """Install :class:`ReferenceAttnProcessor` on every attention module of ``transformer`` for a ``with`` block.

    ``deltas[(layer, kind)]`` lists ``mean|X_t - X_{t-1}|`` (``relative`` and ``cosine`` the other two
    distances) over the whole tensor (all batch rows) for each
    transformer call after the first, where ``layer`` is the attention module's path (as in capture sites).
    """

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer = transformer
        self.deltas: dict[tuple[str, str], list[float]] = {}
        self.relative: dict[tuple[str, str], list[float]] = {}
        self.cosine: dict[tuple[str, str], list[float]] = {}
        self._saved: dict[str, Any] | None = None

    def __enter__(self) -> "ReferenceCapture":
        self._saved = dict(self.transformer.attn_processors)
        processors = {name: ReferenceAttnProcessor(name[: -len(".processor")], self) for name in self._saved}
        self.transformer.set_attn_processor(processors)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._saved is not None:
            self.transformer.set_attn_processor(self._saved)
            self._saved = None

    def held_bytes(self) -> int:
        """Bytes of the previous-step tensors the processors keep alive (distinct storages)."""
        storages: dict[int, int] = {}
        for processor in self.transformer.attn_processors.values():
            for tensor in getattr(processor, "previous", {}).values():
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())
