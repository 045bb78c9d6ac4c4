"""Benchmark: forward+backward of fasthint's head ops without vs with materialised logits.

    python bench/logprobs.py                 # CPU: N=4096, D=256, V=65536 fp32 (the issue's goal shape)
    python bench/logprobs.py --shape 16384,3584,152064 --dtype bfloat16   # GPU, Qwen2.5-7B head
    python bench/logprobs.py --device cuda --preset qwen --dtype bfloat16  # one table per shape: the
        # Qwen2.5-1.5B and 7B heads at N = 4k, 16k, 64k (several shapes: --shape A;B;C)
    python bench/logprobs.py --shape 1024,256,32768 --providers chunked,native,torch   # native vs torch

Ops (``--ops``): ``logprobs``: ``ops.linear_logprobs`` with entropy at T=0.7 under a random upstream
gradient (backward must recompute the logits); ``policy_loss``: the clipped GRPO loss of the head
(``fasthint.loss.fused_policy_loss``, token-mean, T=0.7, 16 sequences), whose torch path forms the gradients
in its forward pass.
Providers: fasthint (impl auto: Triton or chunked torch on CUDA, native on CPU), triton (impl triton:
for policy_loss the kernel with the objective in its epilogue, fused_pg.py; triton_atomic: the same with
the atomic backward instead of the split one), chunked (impl
torch: the chunked torch path), native (impl native: that path with the C++ row kernels of csrc/),
torch eager (materialised
``[N, V]`` logits), torch.compile of the eager code, Liger-Kernel's ``LigerFusedLinearGRPOLoss``
(policy_loss only; ``pip install liger-kernel -c constraints.txt``), triton_filter (policy_loss: the
kernel with gradient filtering at 2^-12; random heads give near-uniform softmaxes, so nearly every
tile is skipped: a lower bound, not what a trained head gets), Cut Cross-Entropy's
``linear_cross_entropy`` (cce: logprobs only, as -loss with ``reduction="none"``, no entropy, filtering off,
hidden states pre-scaled by 1/T; CUDA), and the four bare
matmuls that a head which never holds ``[N, V]`` logits must do (H W^T in the forward, H W^T again
in the backward's recompute, dZ W, dZ^T H: 8NDV, the floor; a design that keeps a chunk's logits
through its backward, as the chunked torch path does, skips the recompute and needs 6NDV of them, but
holds ``[chunk, V]`` buffers; gradient filtering (CCE's, ``triton_filter``) can go below the floor by
skipping the dZ W and dZ^T H work of tiles whose probabilities are all below its threshold, at the cost
of leaving out their gradient, ``|dz| <= (|g| + |e| |log p + H|) p / T`` per skipped entry: not exact).
Each provider runs in a fresh
subprocess; time is the median of ``--repeat`` runs after a warm-up; "extra MiB" is peak memory
above the inputs and their gradients (CUDA: max_memory_allocated; CPU: peak RSS); "x floor" is the
time over the four bare matmuls'. Prints a table per shape, with the issue's goals for the policy
loss (Triton within 1.15x of the floor, at least 2x faster than Liger, at most 2.5 GB extra at the 7B
head and N = 16k), and appends rows to bench/results/logprobs.csv with device, versions and commit.
A provider that fails, runs out of memory or passes ``--timeout`` is reported as skipped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import subprocess
import sys
import time
from typing import Optional

from _results import append_rows, versions

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "logprobs.csv")
FIELDS = ["time", "commit", "device", "torch", "triton", "op", "provider", "n", "d", "v", "dtype", "median_ms",
          "extra_mib", "logits_mib", "note"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


SEQS = 16  # policy_loss: the N tokens form SEQS sequences of N / SEQS tokens
# fasthint's providers: impl auto, the chunked torch path, and that path with the native C++ row kernels
FASTHINT_IMPLS = {"fasthint": "auto", "chunked": "torch", "native": "native", "triton": "triton",
                  "triton_atomic": "triton", "triton_filter": "triton"}
FILTER_EPS = 2.0 ** -12  # triton_filter: gradient filtering below bf16's resolution (--head_grad_filter)


def _make_step(op: str, provider: str, h, w, y, up):
    """The provider's forward+backward of ``op`` on these tensors, as a closure."""
    import torch

    if provider == "matmuls":
        dz = torch.randn(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype) * 1e-3

        def step():  # the forward's logits, the backward's recompute, dH, dW
            with torch.no_grad():
                h @ w.t()
                h @ w.t()
                dz @ w
                dz.t() @ h
        return step
    impl = FASTHINT_IMPLS.get(provider)
    if op == "logprobs":
        if impl is not None:
            from fasthint import ops

            def step():
                lp, ent = ops.linear_logprobs(h, w, y, temperature=0.7, return_entropy=True, impl=impl)
                ((lp * up).sum() + ent.sum()).backward()
            return step
        if provider in ("torch", "torch.compile"):
            f = _COMPILED if provider == "torch.compile" else _eager_logprobs
            return lambda: f(h, w, y, up).backward()
        if provider == "cce":
            from cut_cross_entropy import linear_cross_entropy

            def step():
                lp = -linear_cross_entropy(h / 0.7, w, y, reduction="none", filter_eps=None, impl="cce")
                (lp.float() * up).sum().backward()
            return step
        raise SystemExit(f"{provider} has no {op}")
    n, v = h.shape[0], w.shape[0]
    mask = torch.ones(n, device=h.device)
    adv = torch.randn(SEQS, device=h.device, generator=torch.Generator(h.device).manual_seed(1))
    adv_tok = adv.repeat_interleave(n // SEQS)
    old = torch.full((n,), -math.log(v), device=h.device) + 0.1 * up
    if impl is not None:
        from fasthint.loss import fused_policy_loss

        flt = FILTER_EPS if provider == "triton_filter" else None
        return lambda: fused_policy_loss(h, w, y, adv_tok, mask, old, temperature=0.7, impl=impl,
                                         grad_filter=flt)[0].backward()
    if provider in ("torch", "torch.compile"):
        f = _COMPILED if provider == "torch.compile" else _eager_policy_loss
        return lambda: f(h, w, y, adv_tok, mask, old).backward()
    if provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, temperature=0.7, epsilon_low=0.2,
                                           epsilon_high=0.28, loss_type="dapo")  # dapo = token-mean
        t = n // SEQS
        return lambda: loss_fn(h.view(SEQS, t, -1), w, y.view(SEQS, t), mask.view(SEQS, t), adv,
                               old_per_token_logps=old.view(SEQS, t))[0].backward()
    raise SystemExit(f"unknown provider {provider}")


def _eager_logprobs(h, w, y, up):
    import torch

    z = (h @ w.t()).float() / 0.7
    logprobs = torch.log_softmax(z, -1)
    lp = logprobs.gather(-1, y[:, None]).squeeze(-1)
    return (lp * up).sum() - (logprobs.exp() * logprobs).sum()


def _eager_policy_loss(h, w, y, adv_tok, mask, old):
    import torch

    z = (h @ w.t()).float() / 0.7
    lp = torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)
    ratio = torch.exp(lp - old)
    obj = torch.minimum(ratio * adv_tok, torch.clamp(ratio, 0.8, 1.28) * adv_tok)
    return -(obj * mask).sum() / mask.sum()


_COMPILED = None


def _inputs(n: int, d: int, v: int, dtype, dev: str, seed: int = 0):
    import torch

    g = torch.Generator(device=dev).manual_seed(seed)
    h = (torch.randn(n, d, device=dev, generator=g) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(v, d, device=dev, generator=g) * 0.02).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    return h, w, y, torch.randn(n, device=dev, generator=g)


def _worker(op: str, provider: str, n: int, d: int, v: int, dtype_name: str, repeat: int, device: str) -> dict:
    import torch

    global _COMPILED
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible (use --device cpu or auto)")
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = "cuda" if cuda else "cpu"
    dtype = getattr(torch, dtype_name)
    if provider == "torch.compile":
        _COMPILED = torch.compile(_eager_logprobs if op == "logprobs" else _eager_policy_loss, dynamic=False)
    _make_step(op, provider, *_inputs(64, d, 512, dtype, dev))()  # imports and lazy initialisation
    h, w, y, up = _inputs(n, d, v, dtype, dev)
    grad_mib = (h.numel() + w.numel()) * h.element_size() / 2**20 if provider != "matmuls" else 0.0
    step = _make_step(op, provider, h, w, y, up)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base = _rss_mib()
    step()  # warm-up at the real shape (compilation, autotuning); on CPU its peak RSS is the measure
    extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base - grad_mib
    sync()
    if cuda:
        h.grad = w.grad = None
        torch.cuda.reset_peak_memory_stats()
        base_b = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeat):
        h.grad = w.grad = None
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        extra = (torch.cuda.max_memory_allocated() - base_b) / 2**20 - grad_mib
    times.sort()
    out = {"median_ms": times[len(times) // 2], "extra_mib": extra,
           "device": torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()} threads"}
    if cuda and provider in ("chunked", "fasthint", "triton"):  # did the fp32-accumulating bf16 GEMMs run
        from fasthint_kernels import chunked  # on tensor cores (torch's out_dtype)?

        out["note"] = "" if chunked._OUT_DTYPE_MM else "fp32 GEMM fallback (no out_dtype in this torch)"
    return out


OP_NAMES = {"logprobs": "linear_logprobs+entropy fwd+bwd", "policy_loss": "fused_policy_loss fwd+bwd"}
CPU_PROVIDERS = "fasthint,torch,torch.compile,liger,matmuls"
CUDA_PROVIDERS = "matmuls,triton,triton_atomic,chunked,torch,liger,cce"
PRESETS = {"qwen": [(n, d, v) for d, v in ((1536, 151936), (3584, 152064)) for n in (4096, 16384, 65536)]}


def _run_provider(op: str, prov: str, shape: tuple[int, int, int], args) -> Optional[dict]:
    env = dict(os.environ)
    if prov.startswith("triton") and not args.cuda:  # CPU tensors: the Triton interpreter
        env["TRITON_INTERPRET"] = "1"
    if prov == "triton_atomic":  # the atomic backward instead of the split one (kernels/.../logprobs.py)
        env["FASTHINT_HEAD_BACKWARD"] = "atomic"
    cmd = [sys.executable, __file__, "--worker", prov, "--ops", op, "--shape", ",".join(map(str, shape)),
           "--dtype", args.dtype, "--repeat", str(args.repeat), "--device", args.device]
    limit = min(args.timeout, args.deadline - time.monotonic())
    if limit < 1:
        print(f"{op:<12} {prov:<14} skipped: --budget spent")
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired:
        print(f"{op:<12} {prov:<14} skipped: over its time limit ({limit:.0f} s)")
        return None
    line = res.stdout.strip().splitlines()[-1] if res.returncode == 0 and res.stdout.strip() else ""
    if not line:
        err = (res.stderr.strip().splitlines() or ["failed"])[-1][:120]
        print(f"{op:<12} {prov:<14} skipped: {err}")
        return None
    return json.loads(line)


def _goals(rows: list[dict], n: int, d: int) -> list[str]:
    """The issue's goals for the policy loss, read off one shape's rows."""
    by = {(r["op"], r["provider"]): r for r in rows}
    tri = by.get((OP_NAMES["policy_loss"], "triton"))
    floor = next((r for r in rows if r["provider"] == "matmuls"), None)
    liger = by.get((OP_NAMES["policy_loss"], "liger"))
    if tri is None:
        return []
    out = []
    if floor:
        x = tri["median_ms"] / floor["median_ms"]
        out.append(f"goal: triton within 1.15x of the 4 bare GEMMs: {x:.2f}x ({'met' if x <= 1.15 else 'NOT met'})")
    if liger:
        x = liger["median_ms"] / tri["median_ms"]
        out.append(f"goal: triton at least 2x faster than Liger's GRPO loss: {x:.2f}x "
                   f"({'met' if x >= 2 else 'NOT met'})")
    if n == 16384 and d == 3584:
        gb = tri["extra_mib"] * 2**20 / 1e9
        out.append(f"goal: at most 2.5 GB extra at the 7B head, N = 16k: {gb:.2f} GB "
                   f"({'met' if gb <= 2.5 else 'NOT met'})")
    return out


def _bench_shape(n: int, d: int, v: int, args, vers: dict) -> list[dict]:
    """Every provider of every op at one shape: rows appended to the results as they come, then the table."""
    rows = []
    logits_mib = n * v * 4 / 2**20
    ops_ = args.ops.split(",")
    for op in ops_:
        for prov in args.providers.split(","):
            if (prov == "matmuls" and op != ops_[0]) or (prov in ("liger", "triton_filter") and op != "policy_loss") \
                    or (prov == "cce" and op != "logprobs"):
                continue  # the matmul floor is op-independent: measured once
            out = _run_provider(op, prov, (n, d, v), args)
            if out is None:
                continue
            row = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "commit": vers["commit"],
                   "device": out["device"], "torch": vers["torch"], "triton": vers["triton"],
                   "op": OP_NAMES[op] if prov != "matmuls" else "4 bare matmuls", "provider": prov,
                   "n": n, "d": d, "v": v, "dtype": args.dtype, "median_ms": round(out["median_ms"], 2),
                   "extra_mib": round(out["extra_mib"], 1), "logits_mib": round(logits_mib, 1),
                   "note": out.get("note", "")}
            rows.append(row)
            append_rows(args.results, FIELDS, [row])  # as measured: a run stopped later keeps it
            print(f"{op:<12} {prov:<14} {row['median_ms']:.1f} ms, {row['extra_mib']:.0f} MiB extra", flush=True)
    floor = next((r["median_ms"] for r in rows if r["provider"] == "matmuls"), None)
    print(f"\nforward+backward, N={n} D={d} V={v} {args.dtype} ({rows[0]['device'] if rows else '-'}); "
          f"fp32 logits would take {logits_mib:.0f} MiB")
    print(f"{'op':<32} {'provider':<14} {'median ms':>10} {'x floor':>8} {'extra MiB':>10} {'extra/logits':>13}")
    for r in rows:
        xf = f"{r['median_ms'] / floor:>8.2f}" if floor else f"{'-':>8}"
        print(f"{r['op']:<32} {r['provider']:<14} {r['median_ms']:>10.1f} {xf} {r['extra_mib']:>10.1f} "
              f"{r['extra_mib'] / logits_mib:>12.1%}  {r['note']}")
    for line in _goals(rows, n, d):
        print(line)
    return rows


def _fail(msg: str) -> None:
    """Bad input: one line on stderr, exit status 2."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096,256,65536", help="N,D,V; several separated by ';'")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="a set of shapes (overrides --shape)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--ops", default="logprobs,policy_loss")
    ap.add_argument("--providers", default=None, help=f"comma-separated; default: CPU {CPU_PROVIDERS}, "
                    f"CUDA {CUDA_PROVIDERS}")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per provider and shape")
    ap.add_argument("--budget", type=float, default=float("inf"), help="seconds for the whole run: providers "
                    "that would start after it are skipped, a running one is stopped at it")
    ap.add_argument("--results", default=RESULTS, help="the CSV that rows are appended to")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        shapes = PRESETS[args.preset] if args.preset else \
            [tuple(int(x) for x in sh.split(",")) for sh in args.shape.split(";") if sh.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(sh) != 3 for sh in shapes):
        _fail(f"--shape {args.shape!r}: expected N,D,V (integers), several separated by ';'")
    bad = [sh for sh in shapes if sh[0] % SEQS]
    if bad:
        _fail(f"--shape: N must be a multiple of {SEQS} (got {bad[0][0]})")
    if args.worker:
        print(json.dumps(_worker(args.ops, args.worker, *shapes[0], args.dtype, args.repeat, args.device)))
        return
    import torch

    args.cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.providers = args.providers or (CUDA_PROVIDERS if args.cuda else CPU_PROVIDERS)
    args.deadline = time.monotonic() + args.budget
    vers = versions()
    for n, d, v in shapes:
        _bench_shape(n, d, v, args, vers)


if __name__ == "__main__":
    main()
