"""fasthint's public kernel API with implementation dispatch.

``"torch"`` is the bounded-memory chunked path that also serves CPU training; ``"native"`` the same path
with its per-row work in C++ (``csrc/``, CPU, built on first use; the torch code where it cannot be
built); ``"triton"`` the fused Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``);
``"reference"`` the materialising oracle (tests, benchmarks). ``"auto"``: on CPU native when the head
has at least ``NATIVE_MIN_HEAD`` weights and the extension builds, else torch; on CUDA, Triton for the
advantages and, for the head ops, whichever of Triton and torch a one-time probe finds correct and
faster (``fasthint.autoselect``).

The head ops take an optional final-logit soft-cap (Gemma-2): ``softcap=c`` computes
``log_softmax(c * tanh((hidden @ weight.T + bias) / c) / temperature)[targets]`` (gradient factor
``1 - tanh^2``); ``None`` (the default) leaves the logits as they are. Every path implements it.

Memory: ``linear_logprobs`` and ``fused_linear_loss`` never hold ``[N, V]`` logits; beyond the
inputs and their gradients they use bounded ``[chunk, V]`` buffers (torch path; one more such buffer
for ``1 - tanh^2`` when soft-capped gradients are formed) or O(N) vectors and fp32 gradient
accumulators (Triton).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from fasthint_kernels.chunked import group_advantages_torch, linear_logprobs_chunked
from fasthint_kernels.fused_loss import TokenLoss, fused_linear_loss_chunked
from fasthint_kernels.native import usable
from fasthint_kernels.reference import check_softcap, group_advantages_ref, linear_logprobs_ref
from fasthint_kernels.spec import PGSpec

from fasthint import autoselect

IMPLS = ("auto", "triton", "torch", "native", "reference")
# Below this many head weights (vocabulary x width) ``auto`` keeps the torch path on CPU: building the
# native extension takes about 25 s on 2 cores, and on the toy's head (259 x 128) it then saves
# 0.015 s of a 0.75 s step (docs/RESULTS.md, issue 27), so it would never pay for itself there.
NATIVE_MIN_HEAD = 1 << 20
log = logging.getLogger("fasthint")
_ADV_TRITON_FAILED = False


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def _resolve_head_impl(impl: str, op: str, hidden: torch.Tensor, weight: torch.Tensor, temperature: float,
                       return_entropy: bool, softcap: Optional[float] = None) -> str:
    """``auto``: on CPU the native row kernels when they build (else torch); on CUDA the faster of
    Triton and torch, measured once per head shape with a correctness check (``fasthint.autoselect``)."""
    if _check_impl(impl) != "auto":
        return impl
    if hidden.device.type != "cuda":
        return "native" if weight.numel() >= NATIVE_MIN_HEAD and usable(hidden, weight) else "torch"
    return autoselect.choose_cuda_impl(op, hidden, weight, temperature, return_entropy, softcap=softcap,
                                       linear_logprobs=linear_logprobs, fused_linear_loss=fused_linear_loss)


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, scale: str = "group",
                     eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    """Group-normalised advantages, float32, one per completion; groups keyed by ``group_ids``
    (int64, need not be contiguous). All-equal groups and groups of one get 0."""
    global _ADV_TRITON_FAILED
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards and group_ids must be 1-D of the same length, got "
                         f"{tuple(rewards.shape)} and {tuple(group_ids.shape)}")
    auto_cuda = _check_impl(impl) == "auto" and rewards.device.type == "cuda" and not _ADV_TRITON_FAILED
    if impl == "reference":
        return group_advantages_ref(rewards, group_ids, scale=scale, eps=eps).to(torch.float32)
    if impl == "triton" or auto_cuda:
        from fasthint_kernels.advantages import group_advantages_triton  # lazy: imports triton

        try:
            return group_advantages_triton(rewards, group_ids, scale=scale, eps=eps)
        except Exception as e:  # noqa: BLE001 - auto falls back; an explicit "triton" re-raises
            if not auto_cuda:
                raise
            _ADV_TRITON_FAILED = True
            log.warning("fasthint: Triton group advantages failed (%s: %s); using torch", type(e).__name__, e)
    return group_advantages_torch(rewards, group_ids, scale=scale, eps=eps)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                    return_entropy: bool = False, impl: str = "auto", softcap: Optional[float] = None):
    """log softmax(softcap(hidden @ weight.T + bias) / temperature)[targets] without ``[N, V]`` logits.

    ``hidden [N, D]``, ``weight [V, D]``, ``targets [N]``; fp32 outputs (float64 for float64 inputs),
    differentiable w.r.t. ``hidden``, ``weight`` and ``bias``. Returns ``logp`` or ``(logp, entropy)``.
    ``softcap=c`` (> 0): logits ``c * tanh(logits / c)`` before the temperature (Gemma-2); ``None``: none.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, D] and weight [V, D] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    softcap = check_softcap(softcap)
    impl = _resolve_head_impl(impl, "logprobs", hidden, weight, temperature, return_entropy, softcap)
    if impl == "reference":
        return linear_logprobs_ref(hidden, weight, targets, bias=bias, temperature=temperature,
                                   return_entropy=return_entropy, softcap=softcap)
    if impl == "triton":
        from fasthint_kernels.logprobs import linear_logprobs_triton  # lazy: imports triton

        if hidden.dtype != weight.dtype:  # e.g. fp32 hidden states beside a bf16 head: the head decides
            hidden = hidden.to(weight.dtype)
        return linear_logprobs_triton(hidden, weight, targets, bias=bias, temperature=temperature,
                                      return_entropy=return_entropy, softcap=softcap)
    return linear_logprobs_chunked(hidden, weight, targets, bias=bias, temperature=temperature,
                                   return_entropy=return_entropy, native=impl == "native", softcap=softcap)


def fused_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_loss: TokenLoss, *,
                      bias: Optional[torch.Tensor] = None, temperature: float = 1.0, return_entropy: bool = False,
                      impl: str = "auto", softcap: Optional[float] = None, uses_entropy: bool = False,
                      pg_spec: Optional[PGSpec] = None, grad_filter: Optional[float] = None):
    """``sum_t token_loss(logp)_t`` on the log-probs of a linear head, without ``[N, V]`` logits.

    ``token_loss(logp_rows, start, stop)`` gives the per-token losses of rows ``start:stop``, each a
    function of that token's own log-prob (``fasthint.loss`` builds it from the objective's terms), so
    its gradient reaches the head as one coefficient per token (dL/dlogp). The torch and native paths
    use that in their forward: each logit chunk yields its log-probs, their coefficients and its share
    of dH/dW at once (6NDV, no recompute; ``fasthint_kernels.fused_loss``). The Triton and reference
    paths compose ``linear_logprobs`` (whose backward recomputes logit tiles from the saved
    log-sum-exp) with ``token_loss`` under autograd, unless the Triton path is handed ``pg_spec``.
    Returns ``(loss, logp, entropy)``; ``logp`` and ``entropy`` (None unless ``return_entropy``) detached.
    ``softcap``: as in ``linear_logprobs``.
    ``uses_entropy``: the loss also reads each token's entropy, ``token_loss(logp, start, stop, entropy)``
    (an entropy bonus); its gradient reaches the logits on every path. ``pg_spec``: the same objective
    as per-token tensors and switches (``fasthint.loss`` lowers its terms when it can); the Triton path
    then runs it in the kernel's epilogue (``fasthint_kernels.fused_pg``: one forward, one backward that
    recomputes each logit tile once) instead of composing ``linear_logprobs`` with ``token_loss``;
    ``grad_filter`` is then its ``filter_eps`` (bounded-error gradient filtering; ignored elsewhere).
    """
    softcap = check_softcap(softcap)
    impl = _resolve_head_impl(impl, "policy_loss", hidden, weight, temperature, return_entropy, softcap)
    if impl in ("torch", "native"):
        return fused_linear_loss_chunked(hidden, weight, targets, token_loss, bias=bias, temperature=temperature,
                                         return_entropy=return_entropy, native=impl == "native", softcap=softcap,
                                         uses_entropy=uses_entropy)
    if impl == "triton" and pg_spec is not None:
        from fasthint_kernels.fused_pg import fused_pg_loss  # lazy: imports triton

        if hidden.dtype != weight.dtype:  # the head's dtype decides, as in linear_logprobs
            hidden = hidden.to(weight.dtype)
        loss, logp, entropy = fused_pg_loss(hidden, weight, targets, pg_spec, bias=bias, temperature=temperature,
                                            impl="triton", filter_eps=grad_filter, softcap=softcap)
        return loss, logp, entropy if return_entropy else None
    want_entropy = return_entropy or uses_entropy
    out = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                          return_entropy=want_entropy, impl=impl, softcap=softcap)
    logp, entropy = out if want_entropy else (out, None)
    n = logp.shape[0]
    loss = (token_loss(logp, 0, n, entropy) if uses_entropy else token_loss(logp, 0, n)).sum()
    return loss, logp.detach(), entropy.detach() if return_entropy else None
