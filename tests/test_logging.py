"""What a run shows: --log_completions writes every --logging_steps the step's completions with
their rewards and advantages and prints a few; --report_to wandb works offline (no network)."""
import glob
import json
import os

import pytest


@pytest.mark.slow
def test_log_completions_and_wandb_offline(tmp_path, monkeypatch, capsys):
    import fasthint

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "o"
    cfg = fasthint.TrainConfig(max_steps=2, output_dir=str(out), cache_dir=str(tmp_path / "c"), toy_warmstart_steps=0,
                               toy_train_size=40, eval_data="", prompts_per_step=2, num_generations=4,
                               max_new_tokens=8, progress_bar=False, reward_funcs="math,format",
                               log_completions=True, logging_steps=2, num_completions_to_print=3,
                               report_to="wandb")
    fasthint.train(cfg)
    assert sorted(os.listdir(out / "completions")) == ["step_2.jsonl"]  # every 2nd step only
    recs = [json.loads(line) for line in open(out / "completions" / "step_2.jsonl")]
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(recs) == 2 * 4 and {r["step"] for r in recs} == {2}
    for r in recs:
        assert set(r["rewards"]) == {"math", "format"} and r["hint_level"] == 0
        assert r["reward"] == pytest.approx(r["rewards"]["math"] + r["rewards"]["format"])
        assert isinstance(r["advantage"], float) and r["prompt"] and isinstance(r["completion"], str)
    by_group = {}
    for r in recs:  # GRPO: the advantages of a group sum to zero
        by_group.setdefault(r["uid"], []).append(r["advantage"])
    assert all(abs(sum(a)) < 1e-5 for a in by_group.values())
    assert metrics[1]["reward/mean"] == pytest.approx(sum(r["reward"] for r in recs) / len(recs), rel=1e-5)
    assert "step 2: 3 of 8 completions" in capsys.readouterr().out
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(runs) == 1 and glob.glob(os.path.join(runs[0], "run-*.wandb"))


def test_wandb_without_credentials_is_an_error_before_any_work(tmp_path, monkeypatch):
    import subprocess
    import sys

    from conftest import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "none"), PYTHONPATH=os.pathsep.join([REPO, os.path.join(
        REPO, "kernels")]))
    res = subprocess.run([sys.executable, "-m", "fasthint.train", "--report_to", "wandb", "--output_dir",
                          str(tmp_path / "o"), "--cache_dir", str(tmp_path / "c")], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=300)
    assert res.returncode == 2 and "WANDB_MODE=offline" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "c" / "toy").exists()  # stopped before building anything
