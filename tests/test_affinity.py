"""Affinity diagnostic (fasthint.algorithms.affinity) against independent plain-Python references."""
import math
import random

import pytest
import torch

from fasthint.algorithms.affinity import affinity, group_affinity

F64 = torch.float64


def ref_affinity(lr, adv, mask, eps=0.2):
    """Per-token plain-Python reference; band test in ratio space as the spec states it."""
    sw = sbw = 0.0
    inside = []
    for i, a in enumerate(adv):
        for t, x in enumerate(lr[i]):
            if not mask[i][t]:
                continue
            w = abs(a)
            sw += w
            if math.isfinite(x) and 1 - eps <= math.exp(x) <= 1 + eps:
                sbw += w
                inside.append((w, x))
    if sw == 0 or sbw == 0:
        return 0.0, 0.0, 0.0
    eur = sbw / sw
    mu = sum(w * x for w, x in inside) / sbw
    uc = math.sqrt(sum(w * (x - mu) ** 2 for w, x in inside) / sbw)
    tau = math.log(1 + eps) / 2
    return eur * math.exp(-uc / tau), eur, uc


def run(lr, adv, mask, eps=0.2, dtype=F64):
    out = affinity(torch.tensor(lr, dtype=dtype), torch.tensor(adv, dtype=dtype),
                   torch.tensor(mask, dtype=dtype), eps=eps)
    return tuple(o.item() for o in out)


def close(got, want, tol=1e-12):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=tol, rel=tol), (got, want)


def test_hand_computed_case():
    # seq0 (A=1.5): 0.3 > log(1.2)=0.1823 is outside the band; seq1 (A=-0.5): last token masked.
    lr = [[0.1, -0.05, 0.3], [0.0, 0.15, 5.0]]
    adv, mask = [1.5, -0.5], [[1, 1, 1], [1, 1, 0]]
    sum_w = 1.5 * 3 + 0.5 * 2                                  # 5.5
    band = [(1.5, 0.1), (1.5, -0.05), (0.5, 0.0), (0.5, 0.15)]
    sum_bw = sum(w for w, _ in band)                           # 4.0
    eur = sum_bw / sum_w
    mu = sum(w * x for w, x in band) / sum_bw                  # 0.0375
    uc = math.sqrt(sum(w * (x - mu) ** 2 for w, x in band) / sum_bw)
    aff = eur * math.exp(-uc / (math.log(1.2) / 2))
    assert eur == pytest.approx(8 / 11) and mu == pytest.approx(0.0375)
    got = affinity(torch.tensor(lr, dtype=F64), torch.tensor(adv, dtype=F64), torch.tensor(mask, dtype=F64))
    assert all(g.dim() == 0 and g.dtype == F64 for g in got)
    close(tuple(g.item() for g in got), (aff, eur, uc))
    assert 0 < aff < eur < 1 and uc > 0


@pytest.mark.parametrize("seed", range(6))
def test_random_vs_python_loop(seed):
    rng = random.Random(seed)
    b, t = rng.randint(1, 6), rng.randint(1, 12)
    lr = [[rng.gauss(0, 0.15) for _ in range(t)] for _ in range(b)]
    adv = [rng.choice([0.0, rng.gauss(0, 1)]) for _ in range(b)]
    mask = [[int(rng.random() < 0.8) for _ in range(t)] for _ in range(b)]
    adv[0] = adv[0] or 0.7
    mask[0][0], lr[0][0] = 1, 0.01  # at least one counted, in-band, weighted token
    if t > 1:
        mask[0][1], lr[0][1] = 1, 0.5  # and one counted token outside the band
    want = ref_affinity(lr, adv, mask)
    assert 0 < want[1] < 1
    close(run(lr, adv, mask), want)


def test_all_advantages_zero():
    assert run([[0.0, 0.1], [0.05, -0.1]], [0.0, 0.0], [[1, 1], [1, 1]]) == (0.0, 0.0, 0.0)


def test_no_counted_tokens():
    assert run([[0.0, 0.1], [0.05, -0.1]], [1.0, -2.0], [[0, 0], [0, 0]]) == (0.0, 0.0, 0.0)
    empty = affinity(torch.zeros(0, 0, dtype=F64), torch.zeros(0, dtype=F64), torch.zeros(0, 0, dtype=F64))
    assert tuple(e.item() for e in empty) == (0.0, 0.0, 0.0)


def test_all_counted_tokens_outside_band():
    lr, adv, mask = [[0.5, -0.5], [1.0, 0.0]], [1.0, 2.0], [[1, 1], [1, 0]]
    assert run(lr, adv, mask) == (0.0, 0.0, 0.0)
    assert ref_affinity(lr, adv, mask) == (0.0, 0.0, 0.0)


def test_zero_log_ratios_give_affinity_one():
    assert run([[0.0] * 4] * 3, [1.0, -0.3, 2.0], [[1, 1, 1, 0]] * 3) == (1.0, 1.0, 0.0)


@pytest.mark.parametrize("eps", [0.2, 0.1])
def test_band_boundary_inclusive(eps):
    hi, lo = math.log1p(eps), math.log1p(-eps)
    uc = (hi - lo) / 2  # two equal-weight tokens: std = half the gap
    close(run([[hi, lo]], [1.0], [[1, 1]], eps=eps), (math.exp(-uc / (math.log1p(eps) / 2)), 1.0, uc))
    # one ulp beyond either edge is outside
    beyond = [[math.nextafter(hi, math.inf), math.nextafter(lo, -math.inf), 0.0]]
    third = pytest.approx(1 / 3, abs=1e-15)
    assert run(beyond, [1.0], [[1, 1, 1]], eps=eps) == (third, third, 0.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_log_ratio(bad):
    lr, adv, mask = [[0.1, -0.05, 0.0], [0.02, 0.15, 0.0]], [1.5, -0.5], [[1, 1, 0], [1, 1, 1]]
    base = run(lr, adv, mask)
    lr[0][2] = bad  # masked token: no effect
    assert run(lr, adv, mask) == base
    lr[1][2] = bad  # counted token: outside the band, same as a finite out-of-band value
    got = run(lr, adv, mask)
    assert all(math.isfinite(g) for g in got)
    lr[1][2] = 10.0
    close(got, run(lr, adv, mask))
    close(got, ref_affinity(lr, adv, mask))
    assert got[1] == pytest.approx(4.0 / 4.5, abs=1e-12)  # w: 1.5*2 + 0.5*3 counted, 0.5 outside


def test_eps_changes_tau():
    lr, adv, mask = [[0.12, 0.05, -0.03]], [1.0], [[1, 1, 1]]
    # eps=0.2: all three in the band
    band = [0.12, 0.05, -0.03]
    mu = sum(band) / 3
    uc = math.sqrt(sum((x - mu) ** 2 for x in band) / 3)
    close(run(lr, adv, mask, eps=0.2), (math.exp(-uc / (math.log(1.2) / 2)), 1.0, uc))
    # eps=0.1: 0.12 > log(1.1) leaves the band, tau = ln(1.1)/2
    band = [0.05, -0.03]
    uc = math.sqrt(sum((x - 0.01) ** 2 for x in band) / 2)
    assert uc == pytest.approx(0.04)
    close(run(lr, adv, mask, eps=0.1), (2 / 3 * math.exp(-uc / (math.log(1.1) / 2)), 2 / 3, uc))


def _packed_case(dtype):
    g = torch.Generator().manual_seed(0)
    ids = [11, 3, 42, 7]
    per_group, streams = {}, []
    for gid in ids:
        b, t = 3, 5
        lr = torch.randn(b, t, generator=g, dtype=F64) * 0.15
        adv = torch.randn(b, generator=g, dtype=F64)
        mask = (torch.rand(b, t, generator=g) < 0.8).to(F64)
        lr[0, -1], mask[0, -1] = math.nan, 0.0  # poison on a masked token
        per_group[gid] = (lr.to(dtype), adv.to(dtype), mask.to(dtype))
        streams.append((lr.reshape(-1), adv[:, None].expand(b, t).reshape(-1), mask.reshape(-1),
                        torch.full((b * t,), gid, dtype=torch.long)))
    cat = [torch.cat(x) for x in zip(*streams)]
    perm = torch.randperm(cat[0].numel(), generator=g)
    lr, adv, mask, gid = (x[perm] for x in cat)
    return per_group, (lr.to(dtype), adv.to(dtype), mask.to(dtype), gid)


def test_group_affinity_matches_per_group():
    per_group, packed = _packed_case(F64)
    got = group_affinity(*packed)
    order = sorted(per_group)
    assert torch.equal(torch.unique(packed[3]), torch.tensor(order))
    for j, gid in enumerate(order):
        want = affinity(*per_group[gid])
        close(tuple(o[j].item() for o in got), tuple(w.item() for w in want))
        close(tuple(w.item() for w in want), ref_affinity(*(x.tolist() for x in per_group[gid])))
    assert all(o.shape == (4,) and o.dtype == F64 for o in got)
    assert len(set(got[0].tolist())) == 4 and 0 < got[0].min() and got[0].max() < 1


def test_group_affinity_float32():
    _, packed64 = _packed_case(F64)
    _, packed32 = _packed_case(torch.float32)
    got32, got64 = group_affinity(*packed32), group_affinity(*packed64)
    for a, b in zip(got32, got64):
        assert a.dtype == torch.float32 and a.shape == (4,)
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)
    one = affinity(*(x.float() for x in _packed_case(F64)[0][3]))
    assert all(o.dtype == torch.float32 and o.dim() == 0 for o in one)


def test_no_grad():
    lr = torch.tensor([[0.1, -0.05]], dtype=F64, requires_grad=True)
    out = affinity(lr, torch.tensor([1.0], dtype=F64), torch.ones(1, 2, dtype=F64))
    assert not any(o.requires_grad for o in out)
