"""Issue 30: every algorithm runs 3 toy steps and each logged metric that should vary does: a metric that
is the same number for every algorithm at every step says nothing (DAPO's ``frac_reward_zero_std`` was
always 0, HINT's ``affinity`` always 1). Also: ``--log_completions`` attaches to each completion the
advantage its own group gave it (Guide's were read by another group's index).

The scripted reward makes hints fire and succeed: odd prompts get mixed rewards; an even prompt's
no-hint group fails and its hinted re-sample (the next 4 calls for that prompt) gets mixed rewards."""
import json
from collections import defaultdict

import pytest

ALGOS = ["grpo", "dr_grpo", "dapo", "sage", "sage_light", "guide", "hint"]
# the few metrics this run cannot move, and why (each is a real metric elsewhere)
CONSTANT_HERE = {
    "completion_len/max": "the untrained toy never stops before --max_new_tokens",
    "data/skipped_rows": "the toy's rows are all valid",
    "hint/truncated": "no hinted prompt reaches --max_prompt_length",
    "hint/skipped": "every toy row has a solution",
    "hint/leak_level_1": "the toy's solution prefixes never state the answer; its self-hints never parse",
    "hint/leak_level_2": "as level 1",
    "hint/leak_level_3": "as level 1",
    "hint/rate_level_3": "only SAGE escalates to level 3, and the untrained toy's self-hints never parse",
    "hint/retries": "the untrained toy's self-hints never parse: each request is asked again --hint_retries times",
    "affinity/sampling/eur": "the untrained toy barely conditions on the hint: every sampling ratio stays in the clip "
                             "band",
    "sampling/logp_diff/max": "the HF engine samples with the trainer's own weights: float32 rounding only",
}


def _reward():
    calls: dict = defaultdict(int)

    def reward(completion: str, row: dict) -> float:
        calls[row["uid"]] += 1
        k = calls[row["uid"]]
        if int(row["uid"]) % 2:
            return float(len(completion) % 2 == 0)
        return float(k % 8 > 4 and (k % 2 == 0 or len(completion) % 3 == 0))

    return reward


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import fasthint

    out = {}
    for algo in ALGOS:
        d = tmp_path_factory.mktemp(algo)
        cfg = fasthint.TrainConfig(
            algo=algo, max_steps=3, output_dir=str(d / "o"), cache_dir=str(tmp_path_factory.getbasetemp() / "c"),
            toy_warmstart_steps=0, toy_train_size=8, eval_data="", prompts_per_step=8, num_generations=4,
            max_new_tokens=8, progress_bar=False, steps_per_generation=2, learning_rate=5e-3,
            hint_provider="solution" if algo == "sage_light" else "auto", hint_max_new_tokens=16,
            sage_light_min_acc=0.0,
            log_completions=True, num_completions_to_print=0)
        fasthint.fit(cfg, reward_fn=_reward())
        rows = [json.loads(line) for line in open(d / "o" / "metrics.jsonl")]
        records = [json.loads(line) for s in (1, 2, 3) for line in open(d / "o" / "completions" / f"step_{s}.jsonl")]
        out[algo] = rows, records
    return out


@pytest.mark.slow
def test_every_metric_that_should_vary_does(runs):
    values = defaultdict(set)
    for rows, _ in runs.values():
        assert [r["step"] for r in rows] == [1, 2, 3]
        for r in rows:
            for k, v in r.items():
                if isinstance(v, (int, float)) and k != "step":
                    values[k].add(round(float(v), 9))
    constant = sorted(k for k, v in values.items() if len(v) == 1 and k not in CONSTANT_HERE)
    assert not constant, f"constant over every algorithm and step: {constant}"
    for key in ("frac_reward_zero_std", "affinity", "reward/hinted", "hint/rate_level_1", "dapo/kept_ratio",
                "clip_ratio/low", "rewards/reward/mean"):
        assert len(values[key]) > 1, key


@pytest.mark.slow
def test_logged_completions_carry_their_own_groups_advantages(runs):
    for algo, (_, records) in runs.items():
        groups = defaultdict(list)
        for r in records:  # every logged group trained (DAPO and Guide log the kept ones)
            assert r["advantage"] is not None, (algo, r["step"], r["uid"])
            groups[(r["step"], r["uid"], r["hint_level"])].append((r["reward"], r["advantage"]))
        for key, pairs in groups.items():
            assert sum(a for _, a in pairs) == pytest.approx(0.0, abs=1e-5), (algo, key, pairs)
            for r1, a1 in pairs:
                for r2, a2 in pairs:
                    assert (r1 > r2) == (a1 > a2 + 1e-6), (algo, key, pairs)
