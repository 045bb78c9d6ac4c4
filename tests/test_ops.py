"""Tests for fasthint.ops: group advantages, the clipped policy loss and chunked linear log-probs.

Expected values are computed independently in this file from the formulas of ALGORITHMS.md
sections 1 and 5 (float64, explicit loops or explicit torch formulas). The materialising reference
(``impl="reference"``) is used only where implementations are compared with each other, and as the
same-dtype baseline of the tolerance rule ``|gt - fast| <= |gt - torch_same_dtype| + tol``.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from fasthint import ops
from fasthint_kernels import native
from fasthint_kernels.chunked import linear_logprobs_chunked

IMPLS = ("torch", "reference")
# the native kernels need g++ and ninja; CI (CI=true) must build them, so there they never skip
CPU_HEAD_IMPLS = ("torch", pytest.param("native", marks=pytest.mark.skipif(
    not os.environ.get("CI") and not native.available(),
    reason=f"native CPU kernels not built here: {native.why_unavailable()}")))


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These problems are tiny: intra-op threading only adds contention on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


# ==============================================================================================
# group_advantages
# ==============================================================================================

def _hand_advantages(rewards, group_ids, scale="group", eps=1e-6):
    """ALGORITHMS.md 1.3 with plain Python loops (float64)."""
    r = [float(x) for x in rewards]
    g = [int(x) for x in group_ids]
    n = len(r)

    def bessel_std(vals):
        m = sum(vals) / len(vals)
        return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))

    batch_std = bessel_std(r) if n > 1 else 0.0
    out = [0.0] * n
    for key in set(g):
        idx = [i for i in range(n) if g[i] == key]
        vals = [r[i] for i in idx]
        if len(vals) < 2 or all(v == vals[0] for v in vals):
            continue
        mean = sum(vals) / len(vals)
        for i in idx:
            c = r[i] - mean
            if scale == "group":
                c = c / (bessel_std(vals) + eps)
            elif scale == "batch":
                c = c / (batch_std + eps)
            out[i] = c
    return torch.tensor(out, dtype=torch.float64)


def _close32(got, expected_f64):
    torch.testing.assert_close(got.double(), expected_f64, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_group_advantages_hand_computed_small_case(impl):
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    g = torch.zeros(4, dtype=torch.int64)
    out = ops.group_advantages(r, g, impl=impl)
    std = math.sqrt((4 * 0.25) / 3)  # Bessel: sum of squares 1.0 over n-1 = 3
    a = 0.5 / (std + 1e-6)
    _close32(out, torch.tensor([a, -a, -a, a], dtype=torch.float64))
    assert out.dtype == torch.float32
    assert out.shape == (4,)


@pytest.mark.parametrize("impl", IMPLS)
def test_group_advantages_two_groups_hand_computed(impl):
    # group 0: [1, 0, 0, 0] -> mean 0.25, centred [.75, -.25, -.25, -.25], ss = .75, std = sqrt(.25) = .5
    # group 1: [2, 4] -> mean 3, centred [-1, 1], std = sqrt(2)
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    out = ops.group_advantages(r, g, impl=impl, eps=1e-6)
    e = 1e-6
    exp = [0.75 / (0.5 + e), -0.25 / (0.5 + e), -0.25 / (0.5 + e), -0.25 / (0.5 + e),
           -1 / (math.sqrt(2) + e), 1 / (math.sqrt(2) + e)]
    _close32(out, torch.tensor(exp, dtype=torch.float64))
    # and the larger eps is honoured
    out = ops.group_advantages(r, g, impl=impl, eps=0.5)
    exp = [0.75 / 1.0, -0.25 / 1.0, -0.25 / 1.0, -0.25 / 1.0, -1 / (math.sqrt(2) + 0.5), 1 / (math.sqrt(2) + 0.5)]
    _close32(out, torch.tensor(exp, dtype=torch.float64))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_zero_signal_groups_are_exactly_zero(impl, scale):
    r = torch.tensor([0.3, 0.3, 0.3, 1.0, 1.0, 5.0, 0.0, 1.0])
    g = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])  # group 0, 1 all-equal; group 2 size one; group 3 signal
    out = ops.group_advantages(r, g, scale=scale, impl=impl)
    assert out.dtype == torch.float32
    assert torch.equal(out[:6], torch.zeros(6))
    assert (out[6] < 0) and (out[7] > 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_group_advantages_group_of_one(impl):
    out = ops.group_advantages(torch.tensor([1.0]), torch.tensor([3]), impl=impl)
    assert torch.equal(out, torch.zeros(1))
    out = ops.group_advantages(torch.tensor([1.0, 0.0, 7.0]), torch.tensor([0, 1, 2]), impl=impl)
    assert torch.equal(out, torch.zeros(3))


@pytest.mark.parametrize("impl", IMPLS)
def test_group_advantages_scale_batch_hand_computed(impl):
    r = [1.0, 0.0, 0.0, 2.0, 3.0, 3.0, 9.0]
    g = [0, 0, 1, 1, 2, 2, 5]
    mean_b = sum(r) / len(r)
    std_b = math.sqrt(sum((x - mean_b) ** 2 for x in r) / (len(r) - 1))  # over the whole batch, Bessel
    e = 1e-6
    exp = [0.5 / (std_b + e), -0.5 / (std_b + e), -1.0 / (std_b + e), 1.0 / (std_b + e), 0.0, 0.0, 0.0]
    out = ops.group_advantages(torch.tensor(r), torch.tensor(g), scale="batch", impl=impl)
    _close32(out, torch.tensor(exp, dtype=torch.float64))
    _close32(out, _hand_advantages(r, g, scale="batch"))


@pytest.mark.parametrize("impl", IMPLS)
def test_group_advantages_scale_none_hand_computed(impl):
    r = [1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 3.0]
    g = [0, 0, 0, 0, 1, 1, 2]
    exp = [0.75, -0.25, -0.25, -0.25, -1.0, 1.0, 0.0]
    out = ops.group_advantages(torch.tensor(r), torch.tensor(g), scale="none", impl=impl)
    _close32(out, torch.tensor(exp, dtype=torch.float64))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_non_contiguous_ids_match_contiguous(impl, scale):
    gen = torch.Generator().manual_seed(0)
    # contiguous layout: group A = rows 0..4, group B = rows 5..9, group C = rows 10..11
    r_c = torch.randint(0, 2, (12,), generator=gen).float()
    r_c[:2] = torch.tensor([0.0, 1.0])  # ensure A has signal
    g_c = torch.tensor([0] * 5 + [1] * 5 + [2] * 2)
    # interleaved layout with non-contiguous, non-sorted ids: 7 <-> A, 3 <-> B, 11 <-> C
    perm = torch.tensor([0, 5, 1, 6, 10, 2, 7, 3, 8, 11, 4, 9])
    id_map = {0: 7, 1: 3, 2: 11}
    r_p = r_c[perm]
    g_p = torch.tensor([id_map[int(x)] for x in g_c[perm]])
    out_c = ops.group_advantages(r_c, g_c, scale=scale, impl=impl)
    out_p = ops.group_advantages(r_p, g_p, scale=scale, impl=impl)
    torch.testing.assert_close(out_p, out_c[perm], rtol=1e-6, atol=1e-7)
    _close32(out_p, _hand_advantages(r_p.tolist(), g_p.tolist(), scale=scale))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_torch_equals_reference_random(scale):
    rng = random.Random(1234)
    rewards, gids = [], []
    ids = rng.sample(range(1000), 50)  # 50 distinct, non-contiguous group ids
    for k, gid in enumerate(ids):
        size = 1 if k % 10 == 0 else rng.randint(1, 9)  # several groups of one
        if k % 7 == 3:
            vals = [rng.choice([0.0, 1.0, 0.25])] * size  # all-equal group
        elif k % 2:
            vals = [float(rng.randint(0, 1)) for _ in range(size)]  # binary rewards
        else:
            vals = [rng.uniform(-2, 3) for _ in range(size)]
        rewards += vals
        gids += [gid] * size
    order = list(range(len(rewards)))
    rng.shuffle(order)  # interleave groups
    r = torch.tensor([rewards[i] for i in order], dtype=torch.float32)
    g = torch.tensor([gids[i] for i in order], dtype=torch.int64)
    a_t = ops.group_advantages(r, g, scale=scale, impl="torch")
    a_r = ops.group_advantages(r, g, scale=scale, impl="reference")
    a_auto = ops.group_advantages(r, g, scale=scale)
    assert a_t.dtype == a_r.dtype == torch.float32
    torch.testing.assert_close(a_t, a_r, rtol=1e-6, atol=1e-6)
    assert torch.equal(a_auto, a_t)
    _close32(a_t, _hand_advantages(r.tolist(), g.tolist(), scale=scale))
    # zero-signal and singleton groups are exactly zero in both
    for gid in set(g.tolist()):
        sel = g == gid
        vals = r[sel]
        if vals.numel() < 2 or bool((vals == vals[0]).all()):
            assert torch.equal(a_t[sel], torch.zeros_like(a_t[sel]))
            assert torch.equal(a_r[sel], torch.zeros_like(a_r[sel]))


@pytest.mark.parametrize("impl", IMPLS)
def test_group_advantages_shape_mismatch_raises(impl):
    with pytest.raises(ValueError):
        ops.group_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.int64), impl=impl)
    with pytest.raises(ValueError):
        ops.group_advantages(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int64), impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_group_advantages_bad_scale_and_impl_raise(impl):
    with pytest.raises(ValueError):
        ops.group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.int64), scale="rank", impl=impl)
    with pytest.raises(ValueError):
        ops.group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.int64), impl="triton-nope")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("in_dtype", [torch.int64, torch.float16, torch.float32])
def test_group_advantages_output_is_float32(impl, in_dtype):
    r = torch.tensor([1, 0, 0, 1, 1], dtype=in_dtype)
    out = ops.group_advantages(r, torch.tensor([0, 0, 1, 1, 1]), impl=impl)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_group_advantages_output_is_float32_for_float64_rewards(impl):
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    out = ops.group_advantages(r, torch.zeros(4, dtype=torch.int64), impl=impl)
    assert out.dtype == torch.float32


# ==============================================================================================
# policy_loss
# ==============================================================================================

def _hand_policy_loss(logp, old, adv, mask, *, ref=None, beta=0.0, eps_low=0.2, eps_high=0.28,
                      dual_clip=None, loss_agg="token-mean", num_tokens=None, seq_ids=None,
                      num_seqs=None, seq_weights=None):
    """ALGORITHMS.md 1.4-1.5 with explicit loops in float64. Returns (loss, dloss/dlogp, stats)."""
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
    loss, stats = ops.policy_loss(logp, d["old"], d["adv"], d["mask"], loss_agg=loss_agg, seq_ids=d["seq_ids"],
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
    # impl="reference" is the same function; impl="torch" dispatches to it too
    loss_r, _ = ops.policy_loss(d["logp"], d["old"], d["adv"], d["mask"], loss_agg=loss_agg,
                                seq_ids=d["seq_ids"] if loss_agg == "seq-mean-token-mean" else None,
                                impl="reference", **kw)
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
    loss, stats = ops.policy_loss(logp, old, torch.tensor(A), torch.tensor(mask), loss_agg=loss_agg, **kw)
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
    loss, _ = ops.policy_loss(logp, old, A, mask, dual_clip=3.0)
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
    loss_nd, _ = ops.policy_loss(logp.detach(), old, A, mask)
    assert loss_nd.item() == pytest.approx(-(r[0] * -1 + r[1] * -2 + r[2] * -1 + 1.28 - 0.8) / 5, rel=1e-12)


def test_policy_loss_kl_hand_values():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    old = logp.detach().clone()  # ratio 1 -> obj = A
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    A = torch.tensor([0.5, -0.5, 0.0])
    loss, stats = ops.policy_loss(logp, old, A, torch.ones(3), ref_logp=ref, beta=0.1)
    d = [-0.5, 1.0, 0.0]
    kl = [math.exp(x) - x - 1 for x in d]
    assert loss.item() == pytest.approx(sum(-a + 0.1 * k for a, k in zip([0.5, -0.5, 0.0], kl)) / 3, rel=1e-12)
    assert stats["kl"].item() == pytest.approx(sum(kl) / 3, rel=1e-12)
    (g,) = torch.autograd.grad(loss, logp)
    exp_g = [(-a + 0.1 * (1 - math.exp(x))) / 3 for a, x in zip([0.5, -0.5, 0.0], d)]
    torch.testing.assert_close(g, torch.tensor(exp_g, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    # beta=0 ignores ref_logp entirely (and reports kl=0)
    loss0, stats0 = ops.policy_loss(logp.detach(), old, A, torch.ones(3), ref_logp=ref, beta=0.0)
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
        lp, _ = ops.policy_loss(logp0 + e, d["old"], d["adv"], d["mask"], loss_agg=loss_agg,
                                seq_ids=d["seq_ids"], **kw)
        lm, _ = ops.policy_loss(logp0 - e, d["old"], d["adv"], d["mask"], loss_agg=loss_agg,
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
    loss, _ = ops.policy_loss(logp, old, A, mask)
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
    full, _ = ops.policy_loss(full_logp, d["old"], d["adv"], d["mask"], loss_agg=loss_agg,
                              seq_ids=d["seq_ids"], **kw, **gkw)
    (g_full,) = torch.autograd.grad(full, full_logp)
    # the full-batch call with the default normaliser equals the explicit global one
    default, _ = ops.policy_loss(d["logp"], d["old"], d["adv"], d["mask"], loss_agg=loss_agg,
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
        part, _ = ops.policy_loss(lp, d["old"][sl], d["adv"][sl], d["mask"][sl], loss_agg=loss_agg, seq_ids=sid,
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
    _, stats = ops.policy_loss(logp, old, adv, mask, loss_agg=loss_agg, seq_ids=seq_ids)
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
    loss, _ = ops.policy_loss(logp32, d["old"].float(), d["adv"], d["mask"], ref_logp=d["ref"].float(), beta=0.1)
    exp, _, _ = _hand_policy_loss(logp32.detach().double().tolist(), d["old"].float().double().tolist(),
                                  d["adv"].double().tolist(), [bool(x) for x in d["mask"].tolist()],
                                  ref=d["ref"].float().double().tolist(), beta=0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(exp, rel=1e-5, abs=1e-6)


def test_policy_loss_errors():
    d = _make_tokens()
    with pytest.raises(ValueError):
        ops.policy_loss(d["logp"], d["old"], d["adv"], d["mask"], loss_agg="seq-mean-token-mean")  # no seq_ids
    with pytest.raises(ValueError):
        ops.policy_loss(d["logp"], d["old"], d["adv"], d["mask"], loss_agg="token-sum")
    with pytest.raises(ValueError):
        ops.policy_loss(d["logp"], d["old"], d["adv"], d["mask"], impl="cuda-magic")


# ==============================================================================================
# linear_logprobs
# ==============================================================================================

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
    t = ops.linear_logprobs(h, w, y, bias=b, temperature=TEMP, impl="native" if native.available() else "torch")
    assert torch.equal(a, t)  # auto on CPU: the native row kernels when they build
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
