"""Reward and group metrics over the step's groups (fasthint.reporting), and the batch refill that DAPO and
Guide share (``algorithms.base.fill_batch``): what is reported covers every sampled group."""
import pytest

from fasthint.algorithms import Group, make_algorithm
from fasthint.config import TrainConfig
from test_algorithms import G, Hints, ScriptedEngine, _ctx, _rows


def test_dapo_group_metrics_count_the_dropped_groups():
    """Issue 30: DAPO trains only the informative groups, so its group metrics over the trained ones were
    constants (frac_reward_zero_std 0, and prompts/never_solved blind to the all-0 groups it dropped).
    They are over every sampled group now; the reward figures already were."""
    from fasthint.algorithms.base import SolveTracker
    from fasthint.reporting import step_metrics

    rows = _rows([0, 9, 9, 0])  # rows 1 and 2 are never solved: their groups are all 0 and dropped
    extra = iter([_rows([0, 9]), _rows([0])])
    algo = make_algorithm(TrainConfig(algo="dapo", dapo_max_rounds=3).validate())
    groups, info = algo.rollout(rows, _ctx(rows, ScriptedEngine(), next_rows=lambda: next(extra)))
    assert all(max(g.rewards) > min(g.rewards) for g in groups)
    assert len(info["_sampled_groups"]) == 4 + 2 + 1 and all(not g.completions for g in info["_sampled_groups"])
    out = step_metrics(groups, SolveTracker(), info, {})
    assert out["frac_reward_zero_std"] == pytest.approx(3 / 7)  # the three all-0 groups of the 7 sampled
    assert out["prompts/never_solved"] > 0.0


def test_reward_metrics_mean_the_no_hint_rollouts():
    """Issue 30: ``reward/mean`` covers every group (SAGE-light's hinted ones left it), ``reward/level0``
    the level-0 groups; ``rewards/<name>/mean`` the no-hint rollouts (it included the hinted rounds)
    and ``rewards/<name>/hinted`` the hinted ones; DAPO's headline is over every sampled group."""
    from fasthint.reporting import reward_metrics

    plain = Group("a", {}, [1], [], [1.0, 0.0, 0.0, 1.0], reward_parts={"math": [1.0, 0.0, 0.0, 1.0],
                                                                         "len": [0.5, None, None, None]})
    sage = Group("b", {}, [2], [], [1.0, 1.0, 0.0, 0.0], level=2, reward_parts={"math": [1.0, 1.0, 0.0, 0.0]})
    sage.replacing(Group("b", {}, [2], [], [0.0] * 4, reward_parts={"math": [0.0] * 4, "len": [0.25] * 4}))
    m = reward_metrics([plain, sage])
    assert m["reward/mean"] == pytest.approx(2 / 8) and m["accuracy"] == pytest.approx(2 / 8)
    assert "reward/level0" not in m  # every group has its no-hint rollout
    assert m["rewards/math/mean"] == pytest.approx(2 / 8) and m["rewards/math/hinted"] == pytest.approx(2 / 4)
    assert m["rewards/len/mean"] == pytest.approx((0.5 + 4 * 0.25) / 5) and "rewards/len/hinted" not in m
    light = Group("c", {}, [3], [], [1.0, 0.0, 0.0, 0.0], level=1, reward_parts={"math": [1.0, 0.0, 0.0, 0.0]})
    m = reward_metrics([plain, light])  # SAGE-light: no no-hint rollout of a hinted prompt
    assert m["reward/mean"] == pytest.approx(3 / 8) and m["accuracy"] == pytest.approx(3 / 8)
    assert m["reward/level0"] == pytest.approx(2 / 4) and m["accuracy/level0"] == pytest.approx(2 / 4)
    assert m["reward/hinted"] == pytest.approx(1 / 4) and m["accuracy/hinted"] == pytest.approx(1 / 4)
    assert m["rewards/math/mean"] == pytest.approx(2 / 4) and m["rewards/math/hinted"] == pytest.approx(1 / 4)
    zeros = [Group(u, {}, [0], [], [0.0] * 4, reward_parts={"math": [0.0] * 4}) for u in "xyz"]
    dapo = reward_metrics([plain], [plain] + zeros)  # 4 groups sampled, 1 kept
    assert dapo["reward/mean"] == pytest.approx(2 / 16) and dapo["reward/mean/kept"] == pytest.approx(0.5)
    assert dapo["rewards/math/mean"] == pytest.approx(2 / 16) and "reward/hinted" not in dapo


def test_dapo_reports_rewards_of_every_sampled_group():
    from fasthint.algorithms.base import SolveTracker
    from fasthint.reporting import step_metrics

    rows = _rows([0, 9, 0, 9])  # rows 1 and 3 never solved: dropped by dynamic sampling
    algo = make_algorithm(TrainConfig(algo="dapo", dapo_max_rounds=1).validate())
    groups, info = algo.rollout(rows, _ctx(rows))
    every = info["_sampled_groups"]
    assert len(groups) == 2 and len(every) == 4 and sum(sum(g.rewards) for g in every) == sum(
        sum(g.rewards) for g in groups)
    out = step_metrics(groups, SolveTracker(), info, {})
    assert out["reward/mean"] == pytest.approx(sum(sum(g.rewards) for g in groups) / (4 * G))
    assert out["reward/mean/kept"] == pytest.approx(0.5)


def test_guide_filter_drops_groups_that_stay_all_equal_and_refills_like_dapo():
    """Issue 30: Guide dropped the groups whose rewards stayed all equal after hinting and trained a
    smaller batch; it refills to the full batch now, with DAPO's loop, cap and metrics."""
    rows = _rows([1, 9, 9, 1])  # every group fails without a hint; rows needing 9 fail with one too
    extra = iter([_rows([1, 9]), _rows([1])])
    eng, hints = ScriptedEngine(), Hints()
    algo = make_algorithm(TrainConfig(algo="guide", dapo_max_rounds=3).validate())
    groups, info = algo.rollout(rows, _ctx(rows, eng, hints, next_rows=lambda: next(extra)))
    assert len(groups) == 4 and all(max(g.rewards) > min(g.rewards) and g.level > 0 for g in groups)
    assert info["dapo/rounds"] == 3 and info["dapo/prompts_sampled"] == 4 + 2 + 1
    assert [len(c) for c in hints.calls] == [4, 2, 1] and info["hint/requested"] == 7
    assert len(info["_sampled_groups"]) == 7 and info["dapo/kept_ratio"] == pytest.approx(4 / 7)
    # the metrics count the dropped groups: 3 of the 7 stayed all 0 after their hint
    from fasthint.algorithms.base import SolveTracker
    from fasthint.reporting import step_metrics

    out = step_metrics(groups, SolveTracker(), info, {})
    assert out["frac_reward_zero_std"] == pytest.approx(3 / 7) and out["reward/mean"] == 0.0
    assert out["reward/hinted"] == pytest.approx(4 * 2 / (7 * G)) and out["reward/mean/kept"] == 0.0
    rows = _rows([1, 9, 9, 1])
    off = make_algorithm(TrainConfig(algo="guide", guide_filter=False).validate())
    groups, info = off.rollout(rows, _ctx(rows, ScriptedEngine(), Hints(), next_rows=lambda: 1 / 0))
    assert len(groups) == 4 and "dapo/rounds" not in info
