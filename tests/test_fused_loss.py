"""The loss-fused chunked head (fasthint_kernels.fused_loss) with the policy objective (fasthint.loss)
against a float64 composition of the materialising references, with the |gt - fast| <= |gt - torch32| + tol rule."""
import os

import pytest
import torch

from fasthint import ops
from fasthint.loss import fused_policy_loss, token_weights
from fasthint_kernels import native as native_kernels
from fasthint_kernels.reference import linear_logprobs_ref, policy_loss_ref

from conftest import chunked_policy_loss as fused_policy_loss_chunked

TEMP = 0.7


def _problem(n, d, v, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.3
    b = torch.randn(v, generator=g) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g)
    mask = (torch.rand(n, generator=g) > 0.25).float()
    with torch.no_grad():
        old = linear_logprobs_ref(h.double(), w.double(), y, bias=b.double() if bias else None, temperature=TEMP)
        old = (old + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).float()
        ref = (old.double() + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    sw = torch.rand(n, generator=g) + 0.5
    return h, w, b, y, adv, mask, old, ref, sw


def _composed(hh, ww, bb, y, adv, mask, old, **kw):
    lp = linear_logprobs_ref(hh, ww, y, bias=bb, temperature=TEMP)
    return policy_loss_ref(lp, old.to(lp.dtype), adv, mask, **kw)


def _grads(fn, h, w, b, dtype, upstream):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
    loss, stats = fn(*leaves, *([None] if b is None else []))
    grads = torch.autograd.grad(loss * upstream, leaves)
    return loss.double(), [x.double() for x in grads], stats


def _within(gt, fast, same, rel, name):
    tol = rel * gt.abs().max().item() + 1e-7
    err, err_same = (gt - fast).abs(), (gt - same).abs()
    assert not bool((err > err_same + tol).any()), f"{name}: {err.max().item():.3g} vs {err_same.max().item():.3g}"


CASES = [
    dict(loss_agg="token-mean"),
    dict(loss_agg="token-mean", num_tokens=41.0, dual_clip=3.0),
    dict(loss_agg="seq-mean-token-mean", num_seqs=7),
    dict(loss_agg="seq-mean-token-sum-norm", num_tokens=64.0, beta=0.1, use_ref=True),
    dict(loss_agg="token-mean", beta=0.05, use_ref=True, use_sw=True, eps_high=0.4),
]


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=pytest.mark.skipif(
    not os.environ.get("CI") and not native_kernels.available(), reason="native CPU kernels not built here"))])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("chunk_elems", [1031 * 5, 1 << 21])  # 5-row chunks (8 of them, ragged) and one chunk
def test_fused_chunked_matches_float64(case, chunk_elems, native):
    n, d, v = 37, 48, 1031
    h, w, b, y, adv, mask, old, ref, sw = _problem(n, d, v, seed=11)
    case = dict(case)
    kw = {k: case.pop(k) for k in list(case) if k not in ("use_ref", "use_sw")}
    if case.get("use_ref"):
        kw["ref_logp"] = ref
    if case.get("use_sw"):
        kw["seq_weights"] = sw
    seq_ids = torch.arange(n) // 6
    kw["seq_ids"] = seq_ids
    up = 1.7  # a random-looking upstream scalar: backward must scale the stored gradients

    def fast(hh, ww, bb):
        return fused_policy_loss_chunked(hh, ww, y, adv, mask, old, bias=bb, temperature=TEMP,
                                         chunk_elems=chunk_elems, native=native, **kw)

    def comp(hh, ww, bb):
        kk = {k: (x.to(hh.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
              for k, x in kw.items()}
        return _composed(hh, ww, bb, y, adv.to(hh.dtype), mask, old, **kk)

    gt_loss, gt_grads, _ = _grads(comp, h, w, b, torch.float64, up)
    loss, grads, stats = _grads(fast, h, w, b, torch.float32, up)
    same_loss, same_grads, same_stats = _grads(comp, h, w, b, torch.float32, up)
    assert abs(loss - gt_loss) <= abs(same_loss - gt_loss) + 1e-6
    for name, a, c, e in zip(("dhidden", "dweight", "dbias"), gt_grads, grads, same_grads):
        _within(a, c, e, 1e-5, name)
    assert torch.equal(grads[0][mask == 0], torch.zeros_like(grads[0][mask == 0]))  # hint/prompt tokens
    for k in ("clip_ratio/low", "clip_ratio/high", "kl"):
        assert abs(stats[k].item() - same_stats[k].item()) < 1e-6


def test_fused_chunked_float64_inputs_match_reference_exactly_enough():
    h, w, b, y, adv, mask, old, _, _ = _problem(23, 16, 301, seed=12)
    hh, ww, bb = (x.double().requires_grad_() for x in (h, w, b))
    loss, _ = fused_policy_loss_chunked(hh, ww, y, adv, mask, old, bias=bb, temperature=TEMP, chunk_elems=301 * 4)
    g1 = torch.autograd.grad(loss, (hh, ww, bb))
    assert loss.dtype == torch.float64
    hh2, ww2, bb2 = (x.double().requires_grad_() for x in (h, w, b))
    loss2, _ = _composed(hh2, ww2, bb2, y, adv.double(), mask, old)
    g2 = torch.autograd.grad(loss2, (hh2, ww2, bb2))
    assert abs(loss.item() - loss2.item()) < 1e-12
    for a, c in zip(g1, g2):
        assert torch.allclose(a, c, rtol=1e-10, atol=1e-13)


def test_fused_chunked_frozen_head_and_no_grad():
    h, w, _, y, adv, mask, old, _, _ = _problem(30, 32, 517, seed=13, bias=False)
    hh = h.clone().requires_grad_()
    loss, stats = fused_policy_loss_chunked(hh, w, y, adv, mask, old, temperature=TEMP, return_entropy=True)
    (dh,) = torch.autograd.grad(loss, (hh,))  # weight needs no grad: only dH is formed
    hh2 = h.clone().requires_grad_()
    (dh2,) = torch.autograd.grad(_composed(hh2, w, None, y, adv, mask, old)[0], (hh2,))
    assert torch.allclose(dh, dh2, atol=1e-6)
    with torch.no_grad():  # evaluation: same value, no gradient work, nothing to backprop
        l2, s2 = fused_policy_loss_chunked(h, w, y, adv, mask, old, temperature=TEMP, return_entropy=True)
    assert torch.allclose(l2, loss.detach(), atol=1e-6) and not l2.requires_grad
    gt_lp, gt_ent = linear_logprobs_ref(h.double(), w.double(), y, temperature=TEMP, return_entropy=True)
    assert torch.allclose(s2["entropy"].double(), gt_ent, atol=1e-5)
    assert torch.allclose(stats["logp"].double(), gt_lp, atol=1e-5)
    assert not stats["logp"].requires_grad and not stats["entropy"].requires_grad


def test_fused_chunked_nonfinite_old_logp_off_mask_stays_out():
    h, w, b, y, adv, mask, old, _, _ = _problem(20, 16, 257, seed=14)
    old = old.clone()
    old[mask == 0] = float("nan")
    hh = h.clone().requires_grad_()
    loss, _ = fused_policy_loss_chunked(hh, w, y, adv, mask, old, bias=b, temperature=TEMP, chunk_elems=257 * 3)
    (dh,) = torch.autograd.grad(loss, (hh,))
    assert torch.isfinite(loss) and bool(torch.isfinite(dh).all())


def test_token_weights_sum_to_normalisers():
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0], dtype=torch.float32)
    seq = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    w = token_weights(mask, "seq-mean-token-mean", seq_ids=seq, dtype=torch.float64)
    # sequences 0 and 1 have tokens (2 and 3 of them), sequence 2 none: 1/(2*2) and 1/(3*2)
    assert torch.allclose(w, torch.tensor([.25, .25, 0, 1 / 6, 1 / 6, 1 / 6, 0, 0], dtype=torch.float64))
    assert torch.allclose(token_weights(mask, "token-mean", dtype=torch.float64), mask.double() / 5)
    assert torch.allclose(token_weights(mask, "seq-mean-token-sum-norm", num_tokens=12, dtype=torch.float64),
                          mask.double() / 12)
    with pytest.raises(ValueError, match="seq_ids"):
        token_weights(mask, "seq-mean-token-mean")


def test_ops_auto_on_cpu_uses_the_fused_path(monkeypatch):
    import fasthint_kernels.fused_loss as fl

    calls = []
    real = fl.fused_linear_loss_chunked
    monkeypatch.setattr(ops, "fused_linear_loss_chunked", lambda *a, **k: calls.append(1) or real(*a, **k))
    h, w, b, y, adv, mask, old, _, _ = _problem(10, 16, 97, seed=15)
    fused_policy_loss(h, w, y, adv, mask, old, bias=b)
    assert calls == [1]
