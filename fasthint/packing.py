"""Padding-free micro-batches: a micro-batch's sequences packed into one row, attention per sequence.

A packed micro-batch is ``input_ids [1, T]`` (T = the real tokens of all its sequences) with
``position_ids`` restarting at 0 for each sequence and the cumulative sequence lengths
``cu_seq_lens`` ``[S + 1]``; every token attends causally within its own sequence only, so each
token's hidden state (hence log-prob) is the one the padded micro-batch gives. No token is padding.

The attention that honours the boundaries:

- CUDA with flash-attn (``flash_attention_2``): transformers passes ``cu_seq_lens_q/k`` and
  ``max_length_q/k`` to flash-attn's variable-length kernel (the design card's flash-attn path).
- Elsewhere (CPU, or CUDA without flash-attn): the attention implementation :data:`VARLEN_SDPA`,
  registered here with transformers' ``AttentionInterface``: on a packed forward it runs PyTorch's
  SDPA once per sequence (causal; work ``sum_i L_i^2``, no ``T x T`` mask), on any other forward
  (rollouts with a KV cache, padded batches) it *is* ``sdpa``. Models whose attention needs more than
  SDPA (Gemma-2's attention soft-capping: eager only) cannot pack without flash-attn.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN_SDPA = "fasthint_varlen_sdpa"


def _varlen_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                 **kwargs):
    """``sdpa`` per packed sequence (``cu_seq_lens_q`` given, batch 1), else plain ``sdpa``.
    ``query [1, H, T, d]``, ``key``/``value [1, H_kv, T, d]``; returns ``([1, T, H, d], None)``."""
    cu = kwargs.pop("cu_seq_lens_q", None)
    for k in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(k, None)
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("a packed forward has batch size 1 and no attention mask")
    bounds = cu.tolist()
    outs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None,
                                   dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0]
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1), None


AttentionInterface.register(VARLEN_SDPA, _varlen_sdpa)
AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)


def packed_attention_implementation(attn_implementation: str) -> str:
    """The attention implementation a padding-free trainer loads the model with: flash-attn's stays
    (it has variable-length kernels), ``sdpa`` becomes :data:`VARLEN_SDPA`; anything else cannot pack."""
    if attn_implementation.startswith("flash_attention") or attn_implementation == VARLEN_SDPA:
        return attn_implementation
    if attn_implementation == "sdpa":
        return VARLEN_SDPA
    raise ValueError(f"--padding_free needs flash-attn or sdpa attention, not {attn_implementation!r}")


def packed_model_kwargs(position_ids: torch.Tensor, cu_seq_lens: torch.Tensor, max_length: int,
                        attn_implementation: str) -> dict:
    """The keyword arguments of a packed forward of a transformers model (besides ``input_ids``)."""
    flash = attn_implementation.startswith("flash_attention")
    # sdpa's mask function would turn restarting position ids into a [T, T] block mask: an all-ones
    # 2-D mask makes it return None instead (the per-sequence SDPA above is causal by itself);
    # flash-attn must see no mask, or it unpads by the mask instead of using cu_seq_lens
    mask = None if flash else torch.ones_like(position_ids)
    cu = cu_seq_lens.to(torch.int32)
    return {"attention_mask": mask, "position_ids": position_ids, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": max_length, "max_length_k": max_length}
