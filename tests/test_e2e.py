"""End to end: two GRPO steps of the default setup (tiny warm start), metrics and a loadable checkpoint."""
import itertools
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

REQUIRED = ("step", "reward/mean", "accuracy", "frac_reward_zero_std", "completion_len/mean",
            "completion_len/max", "truncated_ratio", "clip_ratio/low", "clip_ratio/high", "entropy", "loss",
            "grad_norm", "time/generate_s", "time/train_s", "time/step_s", "tokens_per_s")


@pytest.mark.slow
def test_default_run_two_steps(tmp_path):
    out_dir, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m", "fasthint.train",
           "--max_steps", "2", "--output_dir", str(out_dir), "--cache_dir", str(cache),
           "--toy_warmstart_steps", "3", "--toy_train_size", "200", "--eval_max_prompts", "8",
           "--prompts_per_step", "4", "--num_generations", "4", "--max_new_tokens", "24"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert 0.0 <= r["accuracy"] <= 1.0 and r["completion_len/max"] <= 24
    assert os.path.isfile(out_dir / "training_curves.png")
    ev = json.load(open(out_dir / "eval.json"))
    assert "eval/accuracy_level_1" in ev["eval_before"] and "eval/accuracy" in ev["eval_after"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out_dir / "final")
    tok = AutoTokenizer.from_pretrained(out_dir / "final")
    assert model.config.model_type == "qwen2" and tok.chat_template
    # a second run into the same directory keeps the first run's metrics
    res = subprocess.run(cmd[:2] + cmd[5:], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len([f for f in os.listdir(out_dir) if f.startswith("metrics.")]) == 2


@pytest.mark.slow
def test_library_fit_with_user_reward(tmp_path):
    import fasthint

    seen, given = [], []

    def length_reward(completion: str, row: dict) -> float:
        seen.append(row["uid"])
        given.append(float(len(completion) % 2))
        return given[-1]

    cfg = fasthint.TrainConfig(max_steps=1, output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                               toy_warmstart_steps=0, toy_train_size=50, eval_data="", prompts_per_step=2,
                               num_generations=4, max_new_tokens=8, progress_bar=False)
    res = fasthint.fit(cfg, reward_fn=length_reward)
    assert len(seen) == 8 and res["last"]["step"] == 1
    assert res["last"]["reward/mean"] == pytest.approx(sum(given) / len(given))
    assert len(set(seen)) == 2  # two prompts, four completions each


def _tiny_cfg(tmp_path, **kw):
    import fasthint

    base = dict(max_steps=1, output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"), toy_warmstart_steps=0,
                toy_train_size=40, eval_data="", prompts_per_step=2, num_generations=4, max_new_tokens=8,
                progress_bar=False)
    base.update(kw)
    return fasthint.TrainConfig(**base)


@pytest.mark.slow
def test_kl_reference_model_only_with_beta(tmp_path):
    import fasthint

    counter = itertools.count()

    def alternating(completion: str, row: dict) -> float:
        return float(next(counter) % 2)

    res = fasthint.fit(_tiny_cfg(tmp_path, beta=0.1), reward_fn=alternating)
    assert "kl" in res["last"] and res["last"]["kl"] >= 0.0
    res = fasthint.fit(_tiny_cfg(tmp_path / "b"), reward_fn=alternating)
    assert "kl" not in res["last"]


@pytest.mark.slow
def test_nan_reward_stops_with_clear_error_and_keeps_metrics(tmp_path):
    import fasthint

    calls = []

    def flaky(completion: str, row: dict) -> float:
        calls.append(1)
        return float("nan") if len(calls) > 8 else 1.0  # step 1 is fine, step 2 returns NaN

    with pytest.raises(fasthint.FastHintError, match="non-finite"):
        fasthint.fit(_tiny_cfg(tmp_path, max_steps=3), reward_fn=flaky)
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "dapo", "sage", "sage_light", "guide", "hint"])
def test_each_algorithm_trains_on_the_toy(tmp_path, algo):
    import fasthint

    counter = itertools.count()

    def odd_rows_sometimes(completion: str, row: dict) -> float:  # even rows always fail: hints trigger
        return float(int(row["uid"]) % 2 == 1 and next(counter) % 3 == 0)

    cfg = _tiny_cfg(tmp_path, algo=algo, max_steps=2, prompts_per_step=4, hint_max_new_tokens=16,
                    hint_provider="solution" if algo == "sage_light" else "auto", sage_light_min_acc=0.0)
    res = fasthint.fit(cfg, reward_fn=odd_rows_sometimes)
    last = res["last"]
    assert last["step"] == 2 and all(k in last for k in ("hint/rate", "prompts/never_solved", "time/hint_s"))
    assert 0.0 <= last["prompts/never_solved"] <= 1.0
    trained_tokens = last["completion_len/mean"] * 4 * cfg.num_generations
    assert last["sampled_tokens"] == pytest.approx(trained_tokens) if algo in ("grpo", "dr_grpo") else \
        last["sampled_tokens"] >= trained_tokens - 1e-6
    state = json.load(open(tmp_path / "o" / "final" / "algorithm_state.json"))
    assert state["algo"] == algo and state["solve_tracker"]["seen"]
    if algo in ("guide", "hint"):  # dataset hints exist for every all-zero group of the toy
        assert last["hint/requested"] > 0 and last["hint/parse_fail"] == 0.0 and last["hint/rate"] > 0
    if algo == "sage":
        assert last["hint/requested"] > 0  # the untrained toy's self-hints mostly fail to parse: counted
        assert last["sampled_tokens"] > trained_tokens  # the hints are sampled tokens too
    if algo == "sage_light":  # step 2 revisits nothing new, levels start at 0 on first visits
        assert set(state["levels"].values()) <= {0, 1}
    if algo == "dapo":
        assert last["dapo/rounds"] >= 1 and last["frac_reward_zero_std"] > 0.0  # over every sampled group


@pytest.mark.slow
def test_hinting_algo_without_hint_column_is_a_data_error_before_any_work(tmp_path):
    import fasthint

    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1+1=?", "answer": "2"}\n{"question": "2+2=?", "answer": "4"}\n')
    with pytest.raises(fasthint.FastHintError, match="needs a 'hint' column.*--hint_provider self or solution"):
        fasthint.fit(_tiny_cfg(tmp_path, algo="guide", data=str(data)))
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_periodic_evaluation_logs_eval_metrics_in_the_step_row(tmp_path):
    import json

    import fasthint

    cfg = _tiny_cfg(tmp_path, max_steps=3, eval_steps=1, eval_data="toy", eval_max_prompts=4, eval_samples=2,
                    save_steps=0)
    res = fasthint.fit(cfg, reward_fn=lambda text, row: float(len(text) % 2))
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert [("eval/accuracy" in r) for r in rows] == [True, True, False]  # step 3's is eval_after
    for r in rows[:2]:
        assert r["eval/num_prompts"] == 4 and 0 <= r["eval/accuracy"] <= 1 and "eval/avg@2" in r
        assert r["eval/pass@1"] == pytest.approx(r["eval/avg@2"]) and r["eval/pass@2"] >= r["eval/pass@1"]
    assert res["eval_after"]["eval/num_prompts"] == 4


@pytest.mark.slow
def test_hint_aapo_acts_on_the_second_optimizer_step_of_a_toy_run(tmp_path, caplog):
    """Issue 30: with 2 optimizer steps per rollout batch (HINT's recipe), the second step's ratio
    pi_theta / pi_old has left 1, so each logged step's Affinity (the mean over the steps that can
    move it) is below 1 and hinted groups are down-weighted; with one step per batch AAPO cannot act,
    which is said once at the start."""
    import logging

    import fasthint

    calls: dict = {}

    def even_rows_fail(completion: str, row: dict) -> float:
        """Odd rows: mixed rewards. Even rows: a group of 4 fails (the hint fires), then the hinted
        group gets mixed rewards (2 of 4), so its advantages and Affinity are not zero."""
        k = calls[row["uid"]] = calls.get(row["uid"], 0) + 1
        if int(row["uid"]) % 2:
            return float(len(completion) % 2 == 0)
        return float(k % 8 > 4 and k % 2 == 0)

    cfg = _tiny_cfg(tmp_path, algo="hint", max_steps=2, prompts_per_step=8, steps_per_generation=2,
                    learning_rate=5e-3, aapo_lambda=1.0)
    with caplog.at_level(logging.WARNING, logger="fasthint"):
        fasthint.fit(cfg, reward_fn=even_rows_fail)
    assert "never acts" not in caplog.text
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0.0 < r["affinity"] < 1.0 for r in rows), [r.get("affinity") for r in rows]
    one_step = _tiny_cfg(tmp_path / "one", algo="hint", aapo_lambda=1.0)
    with caplog.at_level(logging.WARNING, logger="fasthint"):
        fasthint.algorithms.make_algorithm(one_step.validate())
    assert caplog.text.count("never acts with one optimizer step") == 1
