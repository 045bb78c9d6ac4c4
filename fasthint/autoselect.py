"""``impl="auto"`` on CUDA: pick the Triton kernels or the chunked torch path by measuring both.

Both implementations accumulate in fp32 and are tested against float64 on CPU; which is faster
depends on the GPU, the dtype and the head shape (fasthint_kernels/logprobs.py argues the two designs).
So on the first CUDA call for a key (op, device, dtype, D, V, entropy, soft-cap), ``auto`` builds a
probe problem with the real D and dtype (2048 tokens, ``min(V, 32768)`` vocabulary, random data: the
real weights are never touched), checks Triton's output (log-probs; for the policy loss, the loss of
the kernel that runs the objective in its epilogue) and hidden-state gradient against a float64
reference (the |gt - triton| <= |gt - torch| + tol rule of the tests), times forward+backward of
both, and keeps Triton only if it is correct and not slower. The decision is logged once per key.
A Triton failure (compilation, launch, wrong numbers) logs one warning and keeps the torch path.
Each rank decides on its own; both paths compute the same function.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch
from fasthint_kernels.reference import fp32_dots_exact
from fasthint_kernels.spec import PGSpec

log = logging.getLogger("fasthint")

PROBE_TOKENS = 2048
PROBE_VOCAB = 32768
_DECISIONS: dict[tuple, str] = {}


def _problem(d: int, v: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(PROBE_TOKENS, d, device=device, generator=g).to(dtype)
    w = (torch.randn(v, d, device=device, generator=g) / d ** 0.5).to(dtype)
    y = torch.randint(0, v, (PROBE_TOKENS,), device=device, generator=g)
    up = torch.randn(PROBE_TOKENS, device=device, generator=g)
    return h, w, y, up


def _step(run: Callable, h: torch.Tensor, w: torch.Tensor):
    hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
    out = run(hh, ww)
    out.backward()
    return hh.grad


def _median_ms(fn: Callable, device: torch.device, repeat: int = 3) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _pg_objective(old: torch.Tensor, adv: torch.Tensor, n: int):
    """A clipped-surrogate token-mean loss as a closure (torch paths) and as the Triton kernel's spec."""
    def clipped(lp, s, e):
        r = torch.exp(lp - old[s:e].to(lp.dtype))
        a = adv[s:e].to(lp.dtype)
        return -torch.minimum(r * a, r.clamp(0.8, 1.28) * a) / n
    return clipped, PGSpec(old_logp=old, advantages=adv, weights=torch.full_like(adv, 1.0 / n), eps_low=0.2,
                           eps_high=0.28)


def _triton_correct(op: str, h, w, y, temperature: float, softcap, linear_logprobs: Callable,
                    fused_linear_loss: Callable) -> bool:
    """Triton vs float64 on a 64-token slice; the chunked torch path's error (same dtype) plus a small
    tolerance is the allowance, for the op's output and the hidden-state gradient. The policy loss is
    checked through the kernel that training runs (its objective in the epilogue)."""
    hs, ys = h[:64], y[:64]
    up = torch.linspace(-1, 1, 64, device=h.device, dtype=torch.float64)
    old = torch.full((64,), -float(torch.log(torch.tensor(float(w.shape[0])))), device=h.device) + 0.2 * up.float()
    clipped, spec = _pg_objective(old, up.float(), 64)

    def out_and_grad(impl: str, hh, ww):
        hh = hh.detach().requires_grad_()
        if op == "policy_loss":
            out = fused_linear_loss(hh, ww, ys, clipped, temperature=temperature, impl=impl, softcap=softcap,
                                    pg_spec=spec if impl == "triton" else None)[0]
            total = out
        else:
            out = linear_logprobs(hh, ww, ys, temperature=temperature, impl=impl, softcap=softcap)
            total = (out * up.to(out.dtype)).sum()
        (dh,) = torch.autograd.grad(total, hh)
        return out.detach().double(), dh.double()

    gt = out_and_grad("reference", hs.double(), w.double())
    same = out_and_grad("torch", hs, w)
    fast = out_and_grad("triton", hs, w)
    return all(bool(((a - b).abs() <= (a - c).abs() + 1e-3 * a.abs().max() + 1e-5).all())
               for a, b, c in zip(gt, fast, same))


def fp32_exact_head(dtype: torch.dtype) -> bool:
    """An fp32 head under torch's full-fp32 matmuls: ``auto`` takes the torch path without probing (cuBLAS
    runs fp32 GEMMs at full speed; Triton's exact fp32 dots do not use tensor cores and spill)."""
    return dtype == torch.float32 and fp32_dots_exact()


def choose_cuda_impl(op: str, hidden: torch.Tensor, weight: torch.Tensor, temperature: float,
                     return_entropy: bool, *, linear_logprobs: Callable, fused_linear_loss: Callable,
                     softcap: Optional[float] = None) -> str:
    """``"triton"`` or ``"torch"`` for this CUDA call (measured once per key, then cached). Works on
    CPU tensors too (under ``TRITON_INTERPRET=1``), which is how the tests exercise it.
    ``linear_logprobs`` and ``fused_linear_loss`` are ``fasthint.ops``' functions (passed in, so that
    this module sits below ``ops`` with no import cycle)."""
    key = (op, hidden.device.index, weight.dtype, weight.shape[1], weight.shape[0], return_entropy, softcap)
    if key in _DECISIONS:
        return _DECISIONS[key]
    if hidden.is_cuda and fp32_exact_head(weight.dtype):
        log.info("fasthint: %s on an fp32 head with full-fp32 matmuls uses the chunked torch path (Triton's fp32 "
                 "dots would run on FMA units and spill: bench/results/kernels_compile.csv); allow TF32 "
                 "(torch.backends.cuda.matmul.allow_tf32 = True) to let the probe consider them", op)
        _DECISIONS[key] = "torch"
        return "torch"
    v = min(weight.shape[0], PROBE_VOCAB)
    h, w, y, up = _problem(weight.shape[1], v, weight.dtype, hidden.device)
    clipped, spec = _pg_objective(torch.full_like(up, -float(torch.log(torch.tensor(float(v))))), up, len(y))

    def run(impl: str) -> Callable:
        if op == "policy_loss":  # the Triton side runs the kernel with the objective in its epilogue
            return lambda hh, ww: fused_linear_loss(hh, ww, y, clipped, temperature=temperature, softcap=softcap,
                                                    return_entropy=return_entropy, impl=impl,
                                                    pg_spec=spec if impl == "triton" else None)[0]

        def loss(hh, ww):
            out = linear_logprobs(hh, ww, y, temperature=temperature, return_entropy=return_entropy, impl=impl,
                                  softcap=softcap)
            lp, ent = out if return_entropy else (out, None)
            return (lp * up).sum() + (ent.sum() if ent is not None else 0.0)
        return loss

    try:
        ok = _triton_correct(op, h, w, y, temperature, softcap, linear_logprobs, fused_linear_loss)
        if ok:
            times = {}
            for impl in ("triton", "torch"):
                fn = run(impl)
                _step(fn, h, w)  # warm-up (Triton compiles here)
                times[impl] = _median_ms(lambda: _step(fn, h, w), hidden.device)
    except Exception as e:  # noqa: BLE001 - any Triton failure must leave training on the torch path
        ok, err = False, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    else:
        err = "its log-probs or gradients disagree with the float64 reference"
    dev = torch.cuda.get_device_name(hidden.device) if hidden.device.type == "cuda" else str(hidden.device)
    if not ok:
        log.warning("fasthint: the Triton %s kernels cannot be used on %s (%s); using the chunked torch path",
                    op, dev, err)
        choice = "torch"
    else:
        choice = "triton" if times["triton"] <= times["torch"] else "torch"
        log.info("fasthint: %s on %s %s D=%d V=%d uses %s (probe %d tokens x %d vocab: triton %.1f ms, "
                 "torch %.1f ms)", op, dev, str(weight.dtype).replace("torch.", ""), weight.shape[1],
                 weight.shape[0], choice, PROBE_TOKENS, v, times["triton"], times["torch"])
    _DECISIONS[key] = choice
    return choice
