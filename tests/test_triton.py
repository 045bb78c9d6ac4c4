"""Triton kernels against float64 ground truth. Without a GPU they run under TRITON_INTERPRET=1
(set in conftest.py) on CPU tensors, in fp32 (the interpreter's bf16 tl.dot is wrong)."""
import pytest
import torch

from fasthint import ops
from fasthint.loss import fused_policy_loss

TEMP = 0.7


def _problem(n, d, v, bias, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.3
    b = torch.randn(v, generator=g) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, b, y, torch.randn(n, generator=g), torch.randn(n, generator=g)


def _run(impl, h, w, b, y, g_lp, g_ent, entropy, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
    hh, ww = leaves[0], leaves[1]
    bb = leaves[2] if b is not None else None
    out = ops.linear_logprobs(hh, ww, y, bias=bb, temperature=TEMP, return_entropy=entropy, impl=impl)
    out = out if entropy else (out,)
    loss = (out[0] * g_lp.to(out[0].dtype)).sum() + ((out[1] * g_ent.to(out[1].dtype)).sum() if entropy else 0)
    return [o.detach().double() for o in out], [x.double() for x in torch.autograd.grad(loss, leaves)]


def _within(gt, fast, same, rel, name):
    tol = rel * gt.abs().max().item() + 1e-6
    bad = (gt - fast).abs() > (gt - same).abs() + tol
    assert not bool(bad.any()), f"{name}: max err {(gt - fast).abs().max().item():.3g} vs same-dtype torch " \
                                f"{(gt - same).abs().max().item():.3g}"


@pytest.mark.parametrize("backward", ["split", "atomic"])
@pytest.mark.parametrize("bias,entropy", [(False, False), (True, True), (False, True)])
def test_linear_logprobs_triton_matches_float64(bias, entropy, backward, monkeypatch):
    import fasthint_kernels.head_backward as hb

    monkeypatch.setattr(hb, "DEFAULT_BACKWARD", backward)
    h, w, b, y, g_lp, g_ent = _problem(37, 48, 1031, bias, seed=1)
    gt_out, gt_grads = _run("reference", h, w, b, y, g_lp, g_ent, entropy, torch.float64)
    tr_out, tr_grads = _run("triton", h, w, b, y, g_lp, g_ent, entropy, torch.float32)
    ref_out, ref_grads = _run("reference", h, w, b, y, g_lp, g_ent, entropy, torch.float32)
    for name, a, c, e in zip(("logp", "entropy"), gt_out, tr_out, ref_out):
        _within(a, c, e, 1e-6, name)
    for name, a, c, e in zip(("dhidden", "dweight", "dbias"), gt_grads, tr_grads, ref_grads):
        _within(a, c, e, 1e-5, name)


@pytest.mark.parametrize("splits", [3, 5])
def test_linear_logprobs_forward_split_over_the_vocabulary(splits, monkeypatch):
    import fasthint_kernels.logprobs as lp

    monkeypatch.setattr(lp, "FWD_SPLITS", splits)
    h, w, b, y, g_lp, g_ent = _problem(37, 48, 2100, True, seed=6)
    gt_out, gt_grads = _run("reference", h, w, b, y, g_lp, g_ent, True, torch.float64)
    tr_out, tr_grads = _run("triton", h, w, b, y, g_lp, g_ent, True, torch.float32)
    ref_out, ref_grads = _run("reference", h, w, b, y, g_lp, g_ent, True, torch.float32)
    for name, a, c, e in zip(("logp", "entropy", "dhidden", "dweight", "dbias"), gt_out + gt_grads,
                             tr_out + tr_grads, ref_out + ref_grads):
        _within(a, c, e, 1e-5, name)


def test_triton_masked_tokens_and_frozen_head():
    h, w, _, y, g_lp, _ = _problem(37, 48, 1031, False, seed=2)
    g_lp[::3] = 0.0  # masked tokens: no upstream gradient
    hh = h.clone().requires_grad_()
    lp = ops.linear_logprobs(hh, w, y, temperature=TEMP, impl="triton")  # weight needs no grad
    (dh,) = torch.autograd.grad((lp * g_lp).sum(), (hh,))
    assert torch.equal(dh[::3], torch.zeros_like(dh[::3]))
    gt = ops.linear_logprobs(h.double(), w.double(), y, temperature=TEMP, impl="reference")
    assert torch.allclose(lp.double(), gt, atol=1e-5)


def test_triton_real_vocabulary_size():
    h, w, _, y, _, _ = _problem(4, 16, 151936, False, seed=3)
    lp, ent = ops.linear_logprobs(h, w, y, temperature=TEMP, return_entropy=True, impl="triton")
    gt_lp, gt_ent = ops.linear_logprobs(h.double(), w.double(), y, temperature=TEMP, return_entropy=True,
                                        impl="reference")
    ref_lp, ref_ent = ops.linear_logprobs(h, w, y, temperature=TEMP, return_entropy=True, impl="reference")
    _within(gt_lp, lp.double(), ref_lp.double(), 1e-6, "logp")
    _within(gt_ent, ent.double(), ref_ent.double(), 1e-6, "entropy")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_triton_exact(scale):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (300,), generator=g) * 7 + 3  # non-contiguous, unsorted ids
    r = (torch.rand(300, generator=g) > 0.6).float()
    r[ids == ids[0]] = 1.0  # an all-equal group
    ids[5] = 10_000  # a group of one
    out = ops.group_advantages(r, ids, scale=scale, impl="triton")
    ref = ops.group_advantages(r, ids, scale=scale, impl="reference")
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert out[5] == 0 and bool((out[ids == ids[0]] == 0).all())


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_fused_policy_loss_matches_float64_composition(impl, loss_agg):
    h, w, b, y, _, _ = _problem(37, 48, 1031, True, seed=4)
    g = torch.Generator().manual_seed(5)
    adv = torch.randn(37, generator=g)
    mask = (torch.rand(37, generator=g) > 0.2).float()
    seq_ids = torch.arange(37) // 8
    with torch.no_grad():
        old = ops.linear_logprobs(h.double(), w.double(), y, bias=b.double(), temperature=TEMP, impl="reference")
        old = (old + 0.3 * torch.randn(37, generator=g, dtype=torch.float64)).float()  # ratios off 1: clipping

    def run(dtype, kind):
        hh, ww, bb = (x.detach().to(dtype).requires_grad_() for x in (h, w, b))
        loss, stats = fused_policy_loss(hh, ww, y, adv, mask, old, bias=bb, temperature=TEMP,
                                        return_entropy=True, loss_agg=loss_agg, seq_ids=seq_ids,
                                        num_tokens=50.0, num_seqs=6, dual_clip=3.0, impl=kind)
        return loss.double(), [x.double() for x in torch.autograd.grad(loss, (hh, ww, bb))], stats

    gt_loss, gt_grads, _ = run(torch.float64, "reference")
    loss, grads, stats = run(torch.float32, impl)
    ref_loss, ref_grads, _ = run(torch.float32, "reference")
    assert abs(loss - gt_loss) <= abs(ref_loss - gt_loss) + 1e-6
    for name, a, c, e in zip(("dhidden", "dweight", "dbias"), gt_grads, grads, ref_grads):
        _within(a, c, e, 1e-5, name)
    assert stats["clip_ratio/low"] > 0 or stats["clip_ratio/high"] > 0
    assert torch.equal(grads[0][mask == 0], torch.zeros_like(grads[0][mask == 0]))
