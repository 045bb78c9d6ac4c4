"""Reward functions as plug-ins (fasthint.reward_funcs): built-ins against hand values, a module in a
temporary file run in worker processes by import path, TRL-style functions unchanged, None as "not
applicable", errors naming the function and the row, and the metrics of a short run."""
import json
import sys
import textwrap

import pytest

from fasthint.config import TrainConfig
from fasthint.errors import ConfigError, FastHintError
from fasthint.reward_funcs import Rewards, format_reward, overlong_reward, resolve
from fasthint.toy.model import build_tokenizer

PLUGIN = '''
import time

def brevity(prompts, completions, completion_ids, **kwargs):
    return [1.0 / (1 + len(ids)) for ids in completion_ids]

def level_bonus(completions, level, **kwargs):  # reads a dataset column; None where it has none
    return [None if lv is None else 0.1 * lv for lv in level]

def boom(completions, uid, **kwargs):
    if any("7" in u for u in uid):
        raise ValueError("no sevens")
    return [0.0] * len(completions)

def slow(completions, **kwargs):
    time.sleep(30)
    return [1.0] * len(completions)
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))  # the workers get the trainer's sys.path
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_format_and_overlong_by_hand():
    assert format_reward(["so \\boxed{3}", "no box", "\\boxed{"]) == [1.0, 0.0, 0.0]
    think = ["<think>a</think> \\boxed{1}", "\\boxed{1}", "<think>a</think><think>b</think>\\boxed{1}",
             "\\boxed{1} <think>late</think>"]
    assert format_reward(think, think_tags=True) == [1.0, 0.0, 0.0, 0.0]
    # DAPO: max 20 tokens, buffer 8: 0 up to 12, then (12 - L) / 8, -1 at 20; times the factor
    assert overlong_reward([5, 12, 13, 16, 20], 20, 8, 0.5) == [0.0, 0.0, -0.0625, -0.25, -0.5]


def _rewards(cfg_kw, funcs=None):
    cfg = TrainConfig(**cfg_kw).validate()
    return Rewards(resolve(cfg, funcs), cfg, build_tokenizer(), cfg.max_new_tokens)


def test_import_path_plugins_weights_none_and_correct(plugin):
    rows = [{"uid": "0", "answer": "4", "level": 2}, {"uid": "1", "answer": "5", "level": None}]
    r = _rewards({"reward_funcs": f"math,{plugin}:brevity,{plugin}:level_bonus", "reward_weights": "1,2,0.5"})
    try:
        texts = ["2+2=\\boxed{4}", "\\boxed{6}"]
        ids = [[5, 6, 7], [5]]
        got = r(texts, rows, [[1, 2], [1, 3]], ids)
        assert got.parts["math"] == [1.0, 0.0]
        assert got.parts["brevity"] == [0.25, 0.5]
        assert got.parts["level_bonus"] == [pytest.approx(0.2), None]  # None: left out of the sum
        assert list(got) == [pytest.approx(1 + 2 * 0.25 + 0.5 * 0.2), pytest.approx(2 * 0.5)]
        assert got.correct == [1.0, 0.0]  # auto: math decides what is correct
        from fasthint.algorithms.base import Group
        from fasthint.reporting import reward_metrics

        m = reward_metrics([Group("0", {}, [1], [], list(got), reward_parts=got.parts)])
        assert m["rewards/level_bonus/mean"] == pytest.approx(0.2) and m["rewards/brevity/mean"] == 0.375
    finally:
        r.close()


def test_trl_style_function_in_process_reads_a_column():
    def target_len(completions, target, **kwargs):  # as in TRL's docs: dataset columns arrive as kwargs
        return [-abs(t - len(c)) for c, t in zip(completions, target)]

    r = _rewards({"reward_weights": ""}, funcs=[target_len])
    got = r(["abc", "a"], [{"uid": "0", "target": 3}, {"uid": "1", "target": 4}])
    assert got.parts["target_len"] == [0.0, -3.0] and list(got) == [0.0, -3.0]
    assert got.correct == list(got)  # no math reward: the total decides


def test_errors_name_the_function_and_row(plugin):
    r = _rewards({"reward_funcs": f"{plugin}:boom"})
    try:
        with pytest.raises(FastHintError, match="reward function 'boom' raised on row uid 17: ValueError: no sevens"):
            r(["a", "b"], [{"uid": "3"}, {"uid": "17"}])
    finally:
        r.close()
    with pytest.raises(ConfigError, match="cannot be imported"):
        resolve(TrainConfig(reward_funcs="nope_module:f").validate())
    with pytest.raises(ConfigError, match="2 weights for 1 reward"):
        resolve(TrainConfig(reward_funcs="math", reward_weights="1,2").validate())
    with pytest.raises(ConfigError, match="--correct_reward 'format' is not one of"):
        resolve(TrainConfig(reward_funcs="math", correct_reward="format").validate())
    bad = _rewards({}, funcs=[lambda completions, **kw: [float("nan")] * len(completions)])
    with pytest.raises(FastHintError, match="non-finite"):
        bad(["a"], [{"uid": "0"}])


@pytest.mark.slow
def test_plugin_over_its_deadline_scores_zero(plugin):
    r = _rewards({"reward_funcs": f"{plugin}:slow", "reward_timeout_s": 1.0})
    try:
        assert list(r(["a"], [{"uid": "0"}])) == [0.0]
    finally:
        r.close()


@pytest.mark.slow
def test_run_logs_each_reward_from_an_import_path_with_a_weight(tmp_path, plugin):
    import fasthint

    cfg = fasthint.TrainConfig(max_steps=2, output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                               toy_warmstart_steps=0, toy_train_size=40, eval_data="", prompts_per_step=2,
                               num_generations=4, max_new_tokens=8, progress_bar=False,
                               reward_funcs=f"math,format,{plugin}:brevity", reward_weights="1,0.1,0.5")
    fasthint.train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    for r in rows:
        assert {"rewards/math/mean", "rewards/format/mean", "rewards/brevity/mean"} <= r.keys()
        assert 0 < r["rewards/brevity/mean"] <= 0.5  # 1 / (1 + tokens), tokens >= 1
        want = r["rewards/math/mean"] + 0.1 * r["rewards/format/mean"] + 0.5 * r["rewards/brevity/mean"]
        assert r["reward/mean"] == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's "From Python" block, as written, with a tiny run in place of its settings."""
    import os
    import re

    import fasthint

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "import TrainConfig, train" in b)
    real = fasthint.TrainConfig

    def tiny(**kw):
        kw.update(max_steps=1, cache_dir=str(tmp_path / "c"), toy_warmstart_steps=0, eval_data="",
                  prompts_per_step=2, num_generations=4, max_new_tokens=8, progress_bar=False)
        return real(**kw)

    monkeypatch.setattr(fasthint, "TrainConfig", tiny, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"question": f"{i}+1=?", "answer": str(i + 1)}) + "\n"
                                                  for i in range(4)))
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 - our own README
    rows = [json.loads(line) for line in open(tmp_path / "outputs" / "mine" / "metrics.jsonl")]
    assert "rewards/has_answer_word/mean" in rows[0] and "rewards/math/mean" in rows[0]
