"""fasthint.ops.group_advantages against hand-computed float64 values (the formulas of
docs/ALGORITHMS.md §1, explicit loops), every implementation, odd group layouts and dtypes."""
from __future__ import annotations

import math
import random

import pytest
import torch

from fasthint import ops

from conftest import single_thread

_single_thread = pytest.fixture(autouse=True, scope="module")(single_thread)
IMPLS = ("torch", "reference")


def _hand_advantages(rewards, group_ids, scale="group", eps=1e-6):
    """docs/ALGORITHMS.md §1.3 with plain Python loops (float64)."""
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
