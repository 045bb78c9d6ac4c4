"""fasthint.ops.linear_logprobs (chunked torch and native paths) against float64 ground truth (the
formulas of docs/ALGORITHMS.md §5) with the rule ``|gt - fast| <= |gt - torch_same_dtype| + tol``;
odd shapes, chunking, a real vocabulary size, frozen weights, fallbacks."""
from __future__ import annotations

import math
import os

import pytest
import torch

from fasthint import ops
from fasthint_kernels import native
from fasthint_kernels.chunked import linear_logprobs_chunked

from conftest import cpu_head_impls, single_thread

CPU_HEAD_IMPLS = cpu_head_impls()
_single_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


N, D, V = 37, 48, 1031
TEMP = 0.7


def _problem(dtype=torch.float32, bias=True, seed=0, n=N, d=D, v=V):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.3
    b = torch.randn(v, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    y = torch.randint(0, v, (n,), generator=gen)
    y[0], y[1] = 0, v - 1  # edges of the vocabulary
    g_lp = torch.randn(n, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(n, generator=gen, dtype=torch.float64)
    def cast(t):
        return (None if t is None else t.to(dtype))
    return cast(h), cast(w), cast(b), y, g_lp, g_ent


def _ground_truth(h, w, b, y, temperature, g_lp, g_ent, return_entropy):
    """float64 materialised logits, log_softmax, gather; entropy = -sum p log p; autograd grads."""
    h = h.detach().double().requires_grad_(True)
    w = w.detach().double().requires_grad_(True)
    b = None if b is None else b.detach().double().requires_grad_(True)
    z = h @ w.t()
    if b is not None:
        z = z + b
    z = z / temperature
    logprobs = z - torch.logsumexp(z, dim=-1, keepdim=True)
    logp = logprobs[torch.arange(z.shape[0]), y]
    outs, gouts = [logp], [g_lp]
    if return_entropy:
        ent = -(logprobs.exp() * logprobs).sum(-1)
        outs.append(ent)
        gouts.append(g_ent)
    inputs = [h, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(outs, inputs, grad_outputs=gouts)
    return [o.detach() for o in outs], list(grads)


def _run(fn, h, w, b, y, g_lp, g_ent, return_entropy, **kw):
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    b = None if b is None else b.detach().clone().requires_grad_(True)
    out = fn(h, w, y, bias=b, temperature=TEMP, return_entropy=return_entropy, **kw)
    outs = list(out) if return_entropy else [out]
    gouts = [g_lp.to(outs[0].dtype)] + ([g_ent.to(outs[0].dtype)] if return_entropy else [])
    inputs = [h, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(outs, inputs, grad_outputs=gouts)
    return [o.detach() for o in outs], list(grads)


def _assert_within_rule(gt, fast, same_dtype, tol, what):
    """|gt - fast| <= |gt - torch_same_dtype| + tol, elementwise."""
    gt, fast, same_dtype = gt.double(), fast.double(), same_dtype.double()
    err = (gt - fast).abs()
    bound = (gt - same_dtype).abs() + tol
    bad = err > bound
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} elements out of tolerance, "
                                 f"max excess {(err - bound).max().item():.3e}")


@pytest.mark.parametrize("impl", CPU_HEAD_IMPLS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("return_entropy", [True, False])
def test_linear_logprobs_float32_matches_float64_ground_truth(bias, return_entropy, impl):
    h, w, b, y, g_lp, g_ent = _problem(torch.float32, bias=bias)
    gt_out, gt_grads = _ground_truth(h, w, b, y, TEMP, g_lp, g_ent, return_entropy)
    fast_out, fast_grads = _run(ops.linear_logprobs, h, w, b, y, g_lp, g_ent, return_entropy, impl=impl)
    ref_out, ref_grads = _run(ops.linear_logprobs, h, w, b, y, g_lp, g_ent, return_entropy, impl="reference")
    for o in fast_out:
        assert o.dtype == torch.float32 and o.shape == (N,)
    names = ["logp", "entropy"]
    for k, (gt, fast, ref) in enumerate(zip(gt_out, fast_out, ref_out)):
        _assert_within_rule(gt, fast, ref, 1e-5, names[k])
    gnames = ["d_hidden", "d_weight", "d_bias"]
    assert len(fast_grads) == (3 if bias else 2)
    for k, (gt, fast, ref) in enumerate(zip(gt_grads, fast_grads, ref_grads)):
        assert fast.dtype == torch.float32 and fast.shape == gt.shape
        tol = 1e-5 * gt.abs().max().item() + 1e-6
        _assert_within_rule(gt, fast, ref, tol, gnames[k])
    # sanity: the outputs are real log-probs / entropies
    assert bool((fast_out[0] <= 0).all())
    if return_entropy:
        assert bool((fast_out[1] >= 0).all()) and bool((fast_out[1] <= math.log(V) + 1e-4).all())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("return_entropy", [True, False])
def test_linear_logprobs_float64_inputs_give_float64(bias, return_entropy):
    h, w, b, y, g_lp, g_ent = _problem(torch.float64, bias=bias, seed=1)
    gt_out, gt_grads = _ground_truth(h, w, b, y, TEMP, g_lp, g_ent, return_entropy)
    fast_out, fast_grads = _run(ops.linear_logprobs, h, w, b, y, g_lp, g_ent, return_entropy, impl="torch")
    for gt, fast in zip(gt_out, fast_out):
        assert fast.dtype == torch.float64
        torch.testing.assert_close(fast, gt, rtol=0, atol=1e-10)
    for gt, fast in zip(gt_grads, fast_grads):
        assert fast.dtype == torch.float64
        torch.testing.assert_close(fast, gt, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_logprobs_multiple_chunks_equal_one_chunk(dtype, bias):
    h, w, b, y, g_lp, g_ent = _problem(dtype, bias=bias, seed=2)
    one_out, one_grads = _run(linear_logprobs_chunked, h, w, b, y, g_lp, g_ent, True, chunk_elems=10 * N * V)
    many_out, many_grads = _run(linear_logprobs_chunked, h, w, b, y, g_lp, g_ent, True, chunk_elems=5 * V)
    odd_out, odd_grads = _run(linear_logprobs_chunked, h, w, b, y, g_lp, g_ent, True, chunk_elems=1)  # 1 row
    for a, m, o in zip(one_out + one_grads, many_out + many_grads, odd_out + odd_grads):
        # fp32: matmul blocking differs with the row count (1-row chunks are matrix-vector products)
        rtol, atol = ((1e-5, 1e-5 * a.abs().max().item() + 1e-6) if dtype == torch.float32
                      else (1e-12, 1e-12 * a.abs().max().item() + 1e-13))
        torch.testing.assert_close(m, a, rtol=rtol, atol=atol)
        torch.testing.assert_close(o, a, rtol=rtol, atol=atol)
    # and the multi-chunk result is still right against float64 ground truth
    gt_out, gt_grads = _ground_truth(h, w, b, y, TEMP, g_lp, g_ent, True)
    for gt, m in zip(gt_out + gt_grads, many_out + many_grads):
        torch.testing.assert_close(m.double(), gt, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                                   atol=1e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("return_entropy", [True, False])
def test_linear_logprobs_frozen_weight(return_entropy):
    h, w, b, y, g_lp, g_ent = _problem(torch.float32, bias=True, seed=4)
    gt_out, gt_grads = _ground_truth(h, w, b, y, TEMP, g_lp, g_ent, return_entropy)
    hh = h.clone().requires_grad_(True)
    ww = w.clone()  # requires_grad=False
    bb = b.clone()  # requires_grad=False
    out = linear_logprobs_chunked(hh, ww, y, bias=bb, temperature=TEMP, return_entropy=return_entropy,
                                  chunk_elems=5 * V)
    outs = list(out) if return_entropy else [out]
    loss = (outs[0] * g_lp.float()).sum()
    if return_entropy:
        loss = loss + (outs[1] * g_ent.float()).sum()
    loss.backward()
    assert ww.grad is None and bb.grad is None
    torch.testing.assert_close(hh.grad.double(), gt_grads[0], rtol=1e-4,
                               atol=1e-5 * gt_grads[0].abs().max().item() + 1e-6)
    # also via ops with only weight frozen (bias trainable)
    hh2 = h.clone().requires_grad_(True)
    bb2 = b.clone().requires_grad_(True)
    out = ops.linear_logprobs(hh2, w, y, bias=bb2, temperature=TEMP, return_entropy=return_entropy, impl="torch")
    outs = list(out) if return_entropy else [out]
    gouts = [g_lp.float()] + ([g_ent.float()] if return_entropy else [])
    dh, db = torch.autograd.grad(outs, [hh2, bb2], grad_outputs=gouts)
    torch.testing.assert_close(dh.double(), gt_grads[0], rtol=1e-4,
                               atol=1e-5 * gt_grads[0].abs().max().item() + 1e-6)
    torch.testing.assert_close(db.double(), gt_grads[2], rtol=1e-4,
                               atol=1e-5 * gt_grads[2].abs().max().item() + 1e-6)


@pytest.mark.parametrize("return_entropy", [True, False])
def test_linear_logprobs_zero_upstream_gives_exact_zero_rows(return_entropy):
    h, w, b, y, g_lp, g_ent = _problem(torch.float32, bias=True, seed=5)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[[0, 3, 4, 5, 17, 36]] = True  # spans chunk boundaries with 5 rows per chunk
    g_lp = torch.where(dead, torch.zeros_like(g_lp), g_lp)
    g_ent = torch.where(dead, torch.zeros_like(g_ent), g_ent)
    for kw in ({"chunk_elems": 5 * V}, {}):
        _, grads = _run(linear_logprobs_chunked, h, w, b, y, g_lp, g_ent, return_entropy, **kw)
        dh = grads[0]
        assert torch.equal(dh[dead], torch.zeros_like(dh[dead]))
        assert bool((dh[~dead].abs().sum(-1) > 0).all())
        # and the live rows still match ground truth
        _, gt_grads = _ground_truth(h, w, b, y, TEMP, g_lp, g_ent, return_entropy)
        torch.testing.assert_close(dh.double(), gt_grads[0], rtol=1e-4,
                                   atol=1e-5 * gt_grads[0].abs().max().item() + 1e-6)


def test_linear_logprobs_entropy_only_upstream():
    """Only the entropy is used downstream (logp's upstream gradient is None)."""
    h, w, b, y, g_lp, g_ent = _problem(torch.float32, bias=True, seed=6)
    hh = h.clone().requires_grad_(True)
    _, ent = ops.linear_logprobs(hh, w, y, bias=b, temperature=TEMP, return_entropy=True, impl="torch")
    (dh,) = torch.autograd.grad(ent, hh, grad_outputs=g_ent.float())
    hg = h.double().requires_grad_(True)
    z = (hg @ w.double().t() + b.double()) / TEMP
    lp = torch.log_softmax(z, -1)
    (gt,) = torch.autograd.grad(-(lp.exp() * lp).sum(-1), hg, grad_outputs=g_ent)
    torch.testing.assert_close(dh.double(), gt, rtol=1e-4, atol=1e-5 * gt.abs().max().item() + 1e-6)


def test_linear_logprobs_auto_and_errors():
    h, w, b, y, *_ = _problem(torch.float32, bias=True, seed=7)
    a = ops.linear_logprobs(h, w, y, bias=b, temperature=TEMP)
    assert torch.equal(a, ops.linear_logprobs(h, w, y, bias=b, temperature=TEMP, impl="torch"))  # a small head
    big = w.repeat(ops.NATIVE_MIN_HEAD // w.numel() + 1, 1)  # auto on CPU: the native row kernels when they build
    a = ops.linear_logprobs(h, big, y, temperature=TEMP)
    t = ops.linear_logprobs(h, big, y, temperature=TEMP, impl="native" if native.available() else "torch")
    assert torch.equal(a, t)
    with pytest.raises(ValueError):
        ops.linear_logprobs(h, w[:, :-1], y)
    with pytest.raises(ValueError):
        ops.linear_logprobs(h[0], w, y)
    with pytest.raises(ValueError):
        ops.linear_logprobs(h, w, y, impl="nope")


def _real_vocab_problem():
    v = 151936  # Qwen2.5 tokenizer vocabulary
    h, w, _, y, _, _ = _problem(torch.float32, bias=False, seed=8, n=4, d=16, v=v)
    w = w * 5  # peaky-ish distributions (max logit / T about 28..50)
    y[2] = int(torch.argmax(h[2].double() @ w.double().t()))  # one high-probability target
    z = (h.double() @ w.double().t()) / TEMP
    lp = torch.log_softmax(z, -1)
    return h, w, y, lp[torch.arange(4), y], -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("impl", CPU_HEAD_IMPLS)
def test_linear_logprobs_real_vocabulary_size(impl):
    h, w, y, gt_logp, gt_ent = _real_vocab_problem()
    logp, ent = ops.linear_logprobs(h, w, y, temperature=TEMP, return_entropy=True, impl=impl)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == (4,)
    torch.testing.assert_close(logp.double(), gt_logp, rtol=0, atol=1e-5)
    assert bool((logp <= 0).all())
    torch.testing.assert_close(ent.double(), gt_ent, rtol=0, atol=1e-4)  # the 1e-5 rule: test below
    ref_logp = ops.linear_logprobs(h, w, y, temperature=TEMP, impl="reference")
    _assert_within_rule(gt_logp, logp, ref_logp, 1e-5, "logp")
    # logp alone (return_entropy=False) is the same number
    assert torch.equal(ops.linear_logprobs(h, w, y, temperature=TEMP, impl=impl), logp)


@pytest.mark.parametrize("impl", CPU_HEAD_IMPLS)
def test_linear_logprobs_real_vocabulary_size_entropy_fp32_accuracy(impl):
    h, w, y, _, gt_ent = _real_vocab_problem()
    _, ent = ops.linear_logprobs(h, w, y, temperature=TEMP, return_entropy=True, impl=impl)
    _, ref_ent = ops.linear_logprobs(h, w, y, temperature=TEMP, return_entropy=True, impl="reference")
    _assert_within_rule(gt_ent, ent, ref_ent, 1e-5, "entropy")


@pytest.mark.parametrize("impl", CPU_HEAD_IMPLS)
def test_linear_logprobs_entropy_fp32_with_logit_offset(impl):
    """A common offset on all logits (bias + 30 -> z + 43) changes nothing mathematically."""
    h, w, b, y, g_lp, g_ent = _problem(torch.float32, bias=True, seed=0)
    b = b + 30.0
    gt_out, gt_grads = _ground_truth(h, w, b, y, TEMP, g_lp, g_ent, True)
    fast_out, fast_grads = _run(ops.linear_logprobs, h, w, b, y, g_lp, g_ent, True, impl=impl)
    ref_out, ref_grads = _run(ops.linear_logprobs, h, w, b, y, g_lp, g_ent, True, impl="reference")
    _assert_within_rule(gt_out[0], fast_out[0], ref_out[0], 1e-5, "logp")  # passes
    failures = []
    for name, gt, fast, ref, tol in [("entropy", gt_out[1], fast_out[1], ref_out[1], 1e-5)] + [
            (n, g, f, r, 1e-5 * g.abs().max().item() + 1e-6)
            for n, g, f, r in zip(["d_hidden", "d_weight", "d_bias"], gt_grads, fast_grads, ref_grads)]:
        try:
            _assert_within_rule(gt, fast, ref, tol, name)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, failures


def test_linear_logprobs_logp_only_is_shift_invariant_with_logit_offset():
    """The logp path (and its gradients) is accurate with a large common logit offset."""
    h, w, b, y, g_lp, g_ent = _problem(torch.float32, bias=True, seed=0)
    b = b + 100.0
    gt_out, gt_grads = _ground_truth(h, w, b, y, TEMP, g_lp, g_ent, False)
    fast_out, fast_grads = _run(ops.linear_logprobs, h, w, b, y, g_lp, g_ent, False, impl="torch")
    ref_out, ref_grads = _run(ops.linear_logprobs, h, w, b, y, g_lp, g_ent, False, impl="reference")
    _assert_within_rule(gt_out[0], fast_out[0], ref_out[0], 1e-5, "logp")
    for name, gt, fast, ref in zip(["d_hidden", "d_weight", "d_bias"], gt_grads, fast_grads, ref_grads):
        _assert_within_rule(gt, fast, ref, 1e-5 * gt.abs().max().item() + 1e-6, name)


def test_native_unavailable_falls_back_to_torch_with_one_log_line():
    import subprocess
    import sys

    code = ("import logging, torch; logging.basicConfig(); from fasthint import ops; "
            "g = torch.Generator().manual_seed(0); h = torch.randn(9, 8, generator=g); "
            "w = torch.randn(300, 8, generator=g); y = torch.randint(0, 300, (9,), generator=g); "
            "a = ops.linear_logprobs(h, w, y, impl='native'); b = ops.linear_logprobs(h, w, y, impl='native'); "
            "print(torch.equal(a, ops.linear_logprobs(h, w, y, impl='torch')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "FASTHINT_NATIVE": "0"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "True"
    lines = [ln for ln in res.stderr.splitlines() if "native CPU kernels unavailable" in ln]
    assert len(lines) == 1 and "FASTHINT_NATIVE=0" in lines[0]


def test_native_build_lock_clears_a_lock_left_by_a_killed_build(tmp_path):
    """torch's build lock is a plain file: a build killed midway left it, and every later run waited on it
    forever (seen here). Under fasthint's OS lock a leftover one is removed; the OS lock is released."""
    import fcntl

    from fasthint_kernels import native as native_kernels

    (tmp_path / "lock").write_text("")
    with native_kernels._build_lock(str(tmp_path)):
        assert not (tmp_path / "lock").exists()
    with open(tmp_path / "fasthint.flock") as fh:  # free again: a non-blocking lock succeeds
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.parametrize("impl", CPU_HEAD_IMPLS[1:])
def test_native_linear_logprobs_bfloat16_inputs_add_no_error(impl):
    """bf16 hidden states and head: the native row kernels see the same bf16-rounded logit chunk as
    the torch chunked path and add no error of their own (float64 ground truth of the rounded inputs;
    the chunked torch path in bf16 is the same-dtype baseline)."""
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(21, 32, generator=g), torch.randn(997, 32, generator=g) * 0.3
    y, up = torch.randint(0, 997, (21,), generator=g), torch.randn(21, generator=g)
    hb, wb = h.bfloat16(), w.bfloat16()

    def run(hh, ww, impl_):
        hh, ww = hh.clone().requires_grad_(), ww.clone().requires_grad_()
        lp, ent = ops.linear_logprobs(hh, ww, y, temperature=TEMP, return_entropy=True, impl=impl_)
        ((lp * up).sum() + ent.sum()).backward()
        return [lp.double(), ent.double(), hh.grad.double(), ww.grad.double()]

    gt = run(hb.double(), wb.double(), "reference")
    fast, same = run(hb, wb, impl), run(hb, wb, "torch")
    for name, a, f, s in zip(("logp", "entropy", "d_hidden", "d_weight"), gt, fast, same):
        _assert_within_rule(a, f, s, 1e-5 * a.abs().max().item() + 1e-5, name)
