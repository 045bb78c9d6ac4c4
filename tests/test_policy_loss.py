"""fasthint.loss.policy_loss (the policy objective) against an independent float64 hand computation
(docs/ALGORITHMS.md §1): clip-higher, dual clip, k3 KL, the three aggregations, global normalisers,
masks, micro-batches."""
from __future__ import annotations

import math

import pytest
import torch

from fasthint.loss import ClippedSurrogate, fused_policy_loss, policy_loss
from fasthint_kernels.reference import policy_loss_ref

from conftest import single_thread

_single_thread = pytest.fixture(autouse=True, scope="module")(single_thread)
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _hand_policy_loss(logp, old, adv, mask, *, ref=None, beta=0.0, eps_low=0.2, eps_high=0.28,
                      dual_clip=None, loss_agg="token-mean", num_tokens=None, seq_ids=None,
                      num_seqs=None, seq_weights=None):
    """docs/ALGORITHMS.md §1.4-1.5 with explicit loops in float64. Returns (loss, dloss/dlogp, stats)."""
    n = len(logp)
    tok, dtok = [0.0] * n, [0.0] * n  # per-token loss (before aggregation) and its derivative
    n_mask = sum(1 for i in range(n) if mask[i])
    low = high = 0
    kl_sum = 0.0
    for i in range(n):
        lr = logp[i] - old[i]
        ratio = math.exp(lr)
        a = adv[i]
        unclipped = ratio * a
        clipped = min(max(ratio, 1 - eps_low), 1 + eps_high) * a
        if unclipped <= clipped:
            obj, dobj = unclipped, ratio * a  # d(ratio*A)/dlogp = ratio*A
        else:
            obj, dobj = clipped, 0.0  # clipped ratio is constant
        if dual_clip is not None and a < 0 and dual_clip * a > obj:
            obj, dobj = dual_clip * a, 0.0
        t, dt = -obj, -dobj
        if ref is not None and beta > 0:
            d = ref[i] - logp[i]
            kl = math.exp(d) - d - 1
            t += beta * kl
            dt += beta * (1 - math.exp(d))  # d/dlogp of exp(ref-logp) - (ref-logp) - 1
            if mask[i]:
                kl_sum += kl
        w = 1.0 if seq_weights is None else seq_weights[i]
        tok[i], dtok[i] = t * w, dt * w
        if mask[i]:
            low += (ratio < 1 - eps_low) and (a < 0)
            high += (ratio > 1 + eps_high) and (a > 0)
    grad = [0.0] * n
    if loss_agg == "seq-mean-token-mean":
        seqs = sorted(set(seq_ids[i] for i in range(n) if mask[i]))
        denom = num_seqs if num_seqs is not None else len(seqs)
        loss = 0.0
        for s in seqs:
            members = [i for i in range(n) if seq_ids[i] == s and mask[i]]
            loss += sum(tok[i] for i in members) / len(members) / denom
            for i in members:
                grad[i] = dtok[i] / len(members) / denom
    else:
        denom = num_tokens if num_tokens is not None else n_mask
        loss = sum(tok[i] for i in range(n) if mask[i]) / denom
        for i in range(n):
            if mask[i]:
                grad[i] = dtok[i] / denom
    stats = {"clip_ratio/low": low / n_mask, "clip_ratio/high": high / n_mask,
             "kl": kl_sum / n_mask}
    return loss, grad, stats


def _make_tokens(seed=0):
    """Packed tokens of 5 sequences with log-ratios on both sides of the clip band and inside it."""
    gen = torch.Generator().manual_seed(seed)
    seq_len = [6, 9, 4, 7, 8]
    seq_adv = [1.3, -0.7, 0.0, -1.6, 0.45]
    seq_w = [1.0, 0.5, 2.0, 1.5, 0.25]
    seq_ids = torch.cat([torch.full((L,), s, dtype=torch.int64) for s, L in enumerate(seq_len)])
    n = int(seq_ids.numel())
    adv = torch.tensor([seq_adv[s] for s in seq_ids.tolist()], dtype=torch.float32)
    weights = torch.tensor([seq_w[s] for s in seq_ids.tolist()], dtype=torch.float64)
    # log-ratios cycling through: far below band, far above, inside the band (+-0.05), small
    choices = torch.tensor([-0.5, 0.5, 0.05, -0.05, 0.1, -0.1, 0.7, -0.9])
    log_ratio = choices[torch.arange(n) % len(choices)].double()
    old = -torch.rand(n, generator=gen, dtype=torch.float64) * 3 - 0.1
    logp = old + log_ratio
    ref = old + (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5)
    mask = torch.ones(n)
    mask[[0, 1, 7, 15, 16, 26, 33]] = 0  # "prompt" tokens / padding inside some sequences
    return dict(logp=logp, old=old, adv=adv, mask=mask, seq_ids=seq_ids, ref=ref, weights=weights)


def _call_loss(d, loss_agg, **kw):
    logp = d["logp"].clone().requires_grad_(True)
    loss, stats = policy_loss(logp, d["old"], d["adv"], d["mask"], loss_agg=loss_agg, seq_ids=d["seq_ids"],
                              **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, grad, stats


def _hand(d, loss_agg, **kw):
    kw = dict(kw)
    if "ref_logp" in kw:
        kw["ref"] = kw.pop("ref_logp").tolist() if kw["ref_logp"] is not None else None
    if "seq_weights" in kw and kw["seq_weights"] is not None:
        kw["seq_weights"] = kw["seq_weights"].tolist()
    return _hand_policy_loss(d["logp"].tolist(), d["old"].tolist(), d["adv"].double().tolist(),
                             [bool(x) for x in d["mask"].tolist()], loss_agg=loss_agg,
                             seq_ids=d["seq_ids"].tolist(), **kw)


CASES = {
    "plain": {},
    "dual_clip": {"dual_clip": 3.0},
    "kl": {"beta": 0.1, "ref": True},
    "seq_weights": {"weights": True},
    "all": {"dual_clip": 3.0, "beta": 0.1, "ref": True, "weights": True, "eps_low": 0.1, "eps_high": 0.4},
}


def _case_kwargs(d, case):
    c = dict(CASES[case])
    kw = {}
    if c.pop("ref", False):
        kw["ref_logp"] = d["ref"]
    if c.pop("weights", False):
        kw["seq_weights"] = d["weights"]
    kw.update(c)
    return kw


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("norm", ["default", "global"])
def test_policy_loss_matches_hand_computation(loss_agg, case, norm):
    d = _make_tokens()
    kw = _case_kwargs(d, case)
    if norm == "global":
        if loss_agg == "seq-mean-token-mean":
            kw["num_seqs"] = 11.0
        else:
            kw["num_tokens"] = 123.0 if loss_agg == "token-mean" else 5 * 9.0  # batch size x max length
    loss, grad, stats = _call_loss(d, loss_agg, **kw)
    exp_loss, exp_grad, exp_stats = _hand(d, loss_agg, **kw)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(exp_loss, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, torch.tensor(exp_grad, dtype=torch.float64), rtol=1e-11, atol=1e-14)
    for k in ("clip_ratio/low", "clip_ratio/high", "kl"):
        assert stats[k].item() == pytest.approx(exp_stats[k], rel=1e-12, abs=1e-14), k
    # the kernels' float64 oracle (an independent implementation) agrees
    loss_r, _ = policy_loss_ref(d["logp"], d["old"], d["adv"], d["mask"], loss_agg=loss_agg,
                                seq_ids=d["seq_ids"] if loss_agg == "seq-mean-token-mean" else None, **kw)
    assert loss_r.item() == pytest.approx(exp_loss, rel=1e-12, abs=1e-14)


def test_policy_loss_construction_exercises_every_branch():
    """Guard on the fixture: the hand cases really contain clipped/unclipped tokens of both signs."""
    d = _make_tokens()
    ratio = torch.exp(d["logp"] - d["old"])
    a = d["adv"].double()
    m = d["mask"].bool()
    assert bool(((ratio > 1.28) & (a > 0) & m).any())  # clipped high
    assert bool(((ratio < 0.8) & (a < 0) & m).any())  # clipped low
    assert bool(((ratio > 1.28) & (a < 0) & m).any())  # unclipped, large ratio, A<0
    assert bool(((ratio < 0.8) & (a > 0) & m).any())  # unclipped, small ratio, A>0
    assert bool(((ratio > 0.8) & (ratio < 1.28) & (a != 0) & m).any())  # inside the band
    assert bool(((ratio > 3.0) & (a < 0)).any()) is False  # dual clip needs its own case below


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_policy_loss_simple_hand_values(loss_agg):
    """A few tokens worked out by hand: every clip branch, explicit numbers."""
    lr = [0.5, 0.5, -0.5, -0.5, 0.05, 0.05, 1.5]
    A = [2.0, -1.0, 2.0, -1.0, 1.0, -1.0, -1.0]
    mask = [1, 1, 1, 1, 1, 1, 0]
    old = torch.full((7,), -1.0, dtype=torch.float64)
    logp = (old + torch.tensor(lr, dtype=torch.float64)).requires_grad_(True)
    e_hi, e_lo = math.exp(0.5), math.exp(-0.5)
    obj = [1.28 * 2.0,  # ratio 1.65 > 1.28, A>0: clipped -> (1+eps_high) A
           e_hi * -1.0,  # A<0: min picks ratio*A (more negative), unclipped
           e_lo * 2.0,  # ratio 0.61, A>0: min picks ratio*A, unclipped
           0.8 * -1.0,  # ratio 0.61 < 0.8, A<0: clipped -> (1-eps_low) A
           math.exp(0.05) * 1.0, math.exp(0.05) * -1.0]
    dobj = [0.0, e_hi * -1.0, e_lo * 2.0, 0.0, math.exp(0.05), -math.exp(0.05)]
    denom = 6.0 if loss_agg == "token-mean" else 20.0
    kw = {} if loss_agg == "token-mean" else {"num_tokens": 20.0}
    loss, stats = policy_loss(logp, old, torch.tensor(A), torch.tensor(mask), loss_agg=loss_agg, **kw)
    assert loss.item() == pytest.approx(-sum(obj) / denom, rel=1e-12)
    (g,) = torch.autograd.grad(loss, logp)
    exp_g = [-x / denom for x in dobj] + [0.0]
    torch.testing.assert_close(g, torch.tensor(exp_g, dtype=torch.float64), rtol=1e-12, atol=0)
    assert stats["clip_ratio/low"].item() == pytest.approx(1 / 6)
    assert stats["clip_ratio/high"].item() == pytest.approx(1 / 6)
    assert stats["kl"].item() == 0.0


def test_policy_loss_dual_clip_hand_values():
    # A<0 with a large ratio: plain clipped obj is ratio*A (unbounded), dual clip caps it at c*A
    lr = torch.tensor([2.0, 1.5, 0.5, 2.0, -0.5], dtype=torch.float64)  # ratios 7.39, 4.48, 1.65, 7.39, .61
    A = torch.tensor([-1.0, -2.0, -1.0, 1.0, -1.0])
    old = torch.full((5,), -2.0, dtype=torch.float64)
    mask = torch.ones(5)
    logp = (old + lr).requires_grad_(True)
    loss, _ = policy_loss(logp, old, A, mask, dual_clip=3.0)
    r = [math.exp(x) for x in lr.tolist()]
    obj = [max(r[0] * -1.0, 3.0 * -1.0),  # -> -3 (dual clipped)
           max(r[1] * -2.0, 3.0 * -2.0),  # -> -6 (dual clipped)
           r[2] * -1.0,  # ratio 1.65 < c: not dual clipped
           1.28 * 1.0,  # A>0: dual clip never applies
           0.8 * -1.0]
    assert obj[0] == -3.0 and obj[1] == -6.0
    assert loss.item() == pytest.approx(-sum(obj) / 5, rel=1e-12)
    (g,) = torch.autograd.grad(loss, logp)
    exp_g = torch.tensor([0.0, 0.0, r[2] / 5, 0.0, 0.0], dtype=torch.float64)  # -dobj/denom, dobj = -r
    torch.testing.assert_close(g, exp_g, rtol=1e-12, atol=0)
    # without dual clip the same tokens are not capped
    loss_nd, _ = policy_loss(logp.detach(), old, A, mask)
    assert loss_nd.item() == pytest.approx(-(r[0] * -1 + r[1] * -2 + r[2] * -1 + 1.28 - 0.8) / 5, rel=1e-12)


def test_policy_loss_kl_hand_values():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    old = logp.detach().clone()  # ratio 1 -> obj = A
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    A = torch.tensor([0.5, -0.5, 0.0])
    loss, stats = policy_loss(logp, old, A, torch.ones(3), ref_logp=ref, beta=0.1)
    d = [-0.5, 1.0, 0.0]
    kl = [math.exp(x) - x - 1 for x in d]
    assert loss.item() == pytest.approx(sum(-a + 0.1 * k for a, k in zip([0.5, -0.5, 0.0], kl)) / 3, rel=1e-12)
    assert stats["kl"].item() == pytest.approx(sum(kl) / 3, rel=1e-12)
    (g,) = torch.autograd.grad(loss, logp)
    exp_g = [(-a + 0.1 * (1 - math.exp(x))) / 3 for a, x in zip([0.5, -0.5, 0.0], d)]
    torch.testing.assert_close(g, torch.tensor(exp_g, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    # beta=0 ignores ref_logp entirely (and reports kl=0)
    loss0, stats0 = policy_loss(logp.detach(), old, A, torch.ones(3), ref_logp=ref, beta=0.0)
    assert loss0.item() == pytest.approx(-(0.5 - 0.5) / 3, abs=1e-15)
    assert stats0["kl"].item() == 0.0


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_policy_loss_gradient_inside_and_outside_clip_region(loss_agg):
    """d(-obj)/dlogp = -A*ratio/denominator inside the band, 0 when clipped, 0 on masked tokens."""
    d = _make_tokens(seed=3)
    kw = {"num_tokens": 77.0} if loss_agg != "seq-mean-token-mean" else {"num_seqs": 5.0}
    loss, grad, _ = _call_loss(d, loss_agg, **kw)
    ratio = torch.exp(d["logp"] - d["old"])
    a = d["adv"].double()
    m = d["mask"].bool()
    if loss_agg == "seq-mean-token-mean":
        cnt = torch.zeros(5, dtype=torch.float64).index_add_(0, d["seq_ids"], d["mask"].double())
        denom = cnt[d["seq_ids"]] * 5.0
    else:
        denom = torch.full_like(ratio, 77.0)
    inside = (ratio > 0.8) & (ratio < 1.28)
    clipped = ((ratio > 1.28) & (a > 0)) | ((ratio < 0.8) & (a < 0))
    assert bool((inside & m & (a != 0)).any()) and bool((clipped & m).any())
    torch.testing.assert_close(grad[inside & m], (-a * ratio / denom)[inside & m], rtol=1e-12, atol=0)
    assert torch.equal(grad[clipped & m], torch.zeros_like(grad[clipped & m]))
    assert torch.equal(grad[~m], torch.zeros_like(grad[~m]))
    # float64 central finite differences agree with autograd everywhere (no token sits on a kink)
    h = 1e-6
    logp0 = d["logp"]
    fd = torch.empty_like(logp0)
    for i in range(logp0.numel()):
        e = torch.zeros_like(logp0)
        e[i] = h
        lp, _ = policy_loss(logp0 + e, d["old"], d["adv"], d["mask"], loss_agg=loss_agg,
                                seq_ids=d["seq_ids"], **kw)
        lm, _ = policy_loss(logp0 - e, d["old"], d["adv"], d["mask"], loss_agg=loss_agg,
                                seq_ids=d["seq_ids"], **kw)
        fd[i] = (lp - lm) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)


def test_policy_loss_masked_tokens_do_not_matter():
    d = _make_tokens(seed=5)
    m = d["mask"].bool()
    for loss_agg in LOSS_AGGS:
        kw = {"ref_logp": d["ref"], "beta": 0.1, "seq_weights": d["weights"]}
        base, _, st = _call_loss(d, loss_agg, **kw)
        d2 = dict(d)
        d2["logp"] = torch.where(m, d["logp"], d["logp"] + 3.0)
        d2["old"] = torch.where(m, d["old"], d["old"] - 4.0)
        d2["adv"] = torch.where(m, d["adv"], torch.full_like(d["adv"], -9.0))
        kw2 = dict(kw, ref_logp=torch.where(m, d["ref"], d["ref"] - 5.0))
        other, grad, st2 = _call_loss(d2, loss_agg, **kw2)
        assert other.item() == pytest.approx(base.item(), rel=1e-12, abs=1e-15)
        assert torch.equal(grad[~m], torch.zeros_like(grad[~m]))
        for k in st:
            assert st2[k].item() == pytest.approx(st[k].item(), rel=1e-12, abs=1e-15)


def test_policy_loss_nonfinite_values_on_masked_tokens_are_excluded():
    logp = torch.tensor([-1.0, -1.0, -1.0], dtype=torch.float64)
    old = torch.tensor([-1.1, -float("inf"), -0.9], dtype=torch.float64)
    A = torch.tensor([1.0, -1.0, -1.0])
    mask = torch.tensor([1.0, 0.0, 1.0])
    loss, _ = policy_loss(logp, old, A, mask)
    exp = -(math.exp(0.1) * 1.0 + math.exp(-0.1) * -1.0) / 2  # masked token excluded
    assert loss.item() == pytest.approx(exp, rel=1e-12)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_policy_loss_seq_weights_multiply_token_loss(loss_agg):
    d = _make_tokens(seed=7)
    w = d["weights"]
    kw = {"num_tokens": 50.0} if loss_agg != "seq-mean-token-mean" else {}
    _, g1, _ = _call_loss(d, loss_agg, **kw)
    l2, g2, _ = _call_loss(d, loss_agg, seq_weights=w, **kw)
    torch.testing.assert_close(g2, g1 * w, rtol=1e-12, atol=1e-16)
    # a constant weight scales the loss
    l1, _, _ = _call_loss(d, loss_agg, **kw)
    l3, _, _ = _call_loss(d, loss_agg, seq_weights=torch.full_like(w, 2.5), **kw)
    assert l3.item() == pytest.approx(2.5 * l1.item(), rel=1e-12)
    exp, _, _ = _hand(d, loss_agg, seq_weights=w, **kw)
    assert l2.item() == pytest.approx(exp, rel=1e-12)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_policy_loss_micro_batches_sum_to_full_batch(loss_agg):
    d = _make_tokens(seed=11)
    kw = {"ref_logp": d["ref"], "beta": 0.1, "dual_clip": 3.0, "seq_weights": d["weights"]}
    n_tok_global = float(d["mask"].sum())
    if loss_agg == "token-mean":
        gkw = {"num_tokens": n_tok_global}
    elif loss_agg == "seq-mean-token-sum-norm":
        gkw = {"num_tokens": 5 * 9.0}
    else:
        gkw = {"num_seqs": 5.0}
    full_logp = d["logp"].clone().requires_grad_(True)
    full, _ = policy_loss(full_logp, d["old"], d["adv"], d["mask"], loss_agg=loss_agg,
                              seq_ids=d["seq_ids"], **kw, **gkw)
    (g_full,) = torch.autograd.grad(full, full_logp)
    # the full-batch call with the default normaliser equals the explicit global one
    default, _ = policy_loss(d["logp"], d["old"], d["adv"], d["mask"], loss_agg=loss_agg,
                                 seq_ids=d["seq_ids"], **kw)
    if loss_agg != "seq-mean-token-sum-norm":
        assert default.item() == pytest.approx(full.item(), rel=1e-12)
    # split at a sequence boundary: sequences {0, 1} and {2, 3, 4}
    cut = int((d["seq_ids"] < 2).sum())
    total = 0.0
    grads = []
    for sl in (slice(0, cut), slice(cut, None)):
        lp = d["logp"][sl].clone().requires_grad_(True)
        sid = d["seq_ids"][sl]
        sid = sid - sid.min()  # local re-indexing per micro-batch
        part, _ = policy_loss(lp, d["old"][sl], d["adv"][sl], d["mask"][sl], loss_agg=loss_agg, seq_ids=sid,
                                  ref_logp=d["ref"][sl], beta=0.1, dual_clip=3.0, seq_weights=d["weights"][sl],
                                  **gkw)
        (g,) = torch.autograd.grad(part, lp)
        grads.append(g)
        total += part.item()
    assert total == pytest.approx(full.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(torch.cat(grads), g_full, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_policy_loss_clip_stats(loss_agg):
    gen = torch.Generator().manual_seed(2)
    n = 200
    logp = -torch.rand(n, generator=gen, dtype=torch.float64) * 4
    old = logp + (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 1.6
    adv = torch.randn(n, generator=gen)
    mask = (torch.rand(n, generator=gen) > 0.3).float()
    seq_ids = torch.arange(n) // 10
    _, stats = policy_loss(logp, old, adv, mask, loss_agg=loss_agg, seq_ids=seq_ids)
    low = high = cnt = 0
    for i in range(n):
        if mask[i] == 0:
            continue
        cnt += 1
        r = math.exp(logp[i].item() - old[i].item())
        low += r < 0.8 and adv[i].item() < 0
        high += r > 1.28 and adv[i].item() > 0
    assert 0 < low < cnt and 0 < high < cnt
    assert stats["clip_ratio/low"].item() == pytest.approx(low / cnt, rel=1e-12)
    assert stats["clip_ratio/high"].item() == pytest.approx(high / cnt, rel=1e-12)
    assert stats["kl"].item() == 0.0


def test_policy_loss_float32_inputs():
    d = _make_tokens(seed=13)
    logp32 = d["logp"].float().requires_grad_(True)
    loss, _ = policy_loss(logp32, d["old"].float(), d["adv"], d["mask"], ref_logp=d["ref"].float(), beta=0.1)
    exp, _, _ = _hand_policy_loss(logp32.detach().double().tolist(), d["old"].float().double().tolist(),
                                  d["adv"].double().tolist(), [bool(x) for x in d["mask"].tolist()],
                                  ref=d["ref"].float().double().tolist(), beta=0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(exp, rel=1e-5, abs=1e-6)


def test_policy_loss_errors():
    d = _make_tokens()
    with pytest.raises(ValueError):
        policy_loss(d["logp"], d["old"], d["adv"], d["mask"], loss_agg="seq-mean-token-mean")  # no seq_ids
    with pytest.raises(ValueError):
        policy_loss(d["logp"], d["old"], d["adv"], d["mask"], loss_agg="token-sum")
    with pytest.raises(TypeError):
        policy_loss(d["logp"], d["old"], d["adv"], d["mask"], impl="cuda-magic")  # no impl: elementwise torch
    with pytest.raises(ValueError, match="either terms"):
        policy_loss(d["logp"], d["old"], d["adv"], d["mask"], terms=[ClippedSurrogate()], beta=0.1)
    with pytest.raises(ValueError, match="impl"):
        fused_policy_loss(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), d["adv"][:3],
                          d["mask"][:3], d["old"][:3], impl="cuda-magic")


def test_single_process_bf16_hands_the_head_bf16_inputs(monkeypatch):
    """Single-process ``--bf16`` autocasts the body but leaves the final norm and the head in fp32; the
    head's kernels get bf16 hidden states and weights, as under FSDP's bf16 mixed precision (issue 29),
    in the update and in the no-grad log-probs alike, and the fp32 master weight gets an fp32 gradient."""
    from types import SimpleNamespace

    from fasthint import ops
    from fasthint.loss import PolicyLoss, micro_batch_logprobs
    from fasthint.toy.model import build_model, build_tokenizer

    seen = []
    real_loss, real_lp = ops.fused_linear_loss, ops.linear_logprobs
    monkeypatch.setattr(ops, "fused_linear_loss", lambda h, w, *a, **k: seen.append((h.dtype, w.dtype)) or
                        real_loss(h, w, *a, **k))
    monkeypatch.setattr(ops, "linear_logprobs", lambda h, w, *a, **k: seen.append((h.dtype, w.dtype)) or
                        real_lp(h, w, *a, **k))
    tok = build_tokenizer()
    policy = PolicyLoss(build_model(tok, seed=0))
    ids = torch.randint(3, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    idx, targets = torch.arange(4, 11), ids[0, 5:12]
    n = targets.numel()
    for autocast in (True, False):
        loss, _ = policy(ids[:1], torch.ones_like(ids[:1]), idx, targets, autocast=autocast,
                         advantages=torch.ones(n), mask=torch.ones(n), old_logp=torch.full((n,), -3.0))
        loss.backward()
        head = policy.lm.get_output_embeddings().weight
        assert head.dtype == head.grad.dtype == torch.float32 and bool(head.grad.abs().sum() > 0)
        policy.zero_grad()
        mb = SimpleNamespace(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), packed=False,
                             score_index=idx, targets=targets)
        micro_batch_logprobs(policy.lm, mb, 1.0, autocast)
    bf, f32 = torch.bfloat16, torch.float32
    assert seen == [(bf, bf), (bf, bf), (f32, f32), (f32, f32)]
