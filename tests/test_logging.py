"""What a run shows: --log_completions writes every --logging_steps the step's completions with
their rewards and advantages and prints a few; --report_to wandb works offline (no network); the
progress is a bar on a terminal and plain lines in a log file."""
import glob
import io
import json
import logging
import os
import re

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


@pytest.mark.slow
def test_a_redirected_run_logs_plain_progress_lines(tmp_path):
    """With stderr in a file, no progress bar (no carriage returns): a plain line every --logging_steps
    steps and at the last."""
    import subprocess
    import sys

    from conftest import REPO

    log = tmp_path / "run.log"
    cmd = [sys.executable, "-m", "fasthint.train", "--max_steps", "3", "--logging_steps", "2",
           "--output_dir", str(tmp_path / "o"), "--cache_dir", str(tmp_path / "c"), "--toy_warmstart_steps", "0",
           "--toy_train_size", "40", "--eval_data", "", "--prompts_per_step", "2", "--num_generations", "4",
           "--max_new_tokens", "8", "--save_steps", "0"]
    with open(log, "w") as fh:
        res = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert res.returncode == 0, text[-3000:]
    assert "\r" not in text
    steps = re.findall(r"INFO step (\d)/3 reward \d\.\d{3} acc \d\.\d{3} hint \d\.\d{2} \(\d+\.\d s/step, eta \d+s\)$",
                       text, flags=re.M)
    assert steps == ["2", "3"], text[-3000:]
    # where the time went, once at the end: the phases add up to the total (with "other")
    clock = re.findall(r"INFO time (\S+) for 3 steps: (.*)$", text, flags=re.M)
    assert len(clock) == 1 and "rollouts" in clock[0][1] and "update" in clock[0][1], text[-3000:]


def test_run_clock_splits_the_wall_time_by_phase(monkeypatch):
    from fasthint import reporting

    now = [100.0]
    monkeypatch.setattr(reporting.time, "perf_counter", lambda: now[0])
    clock = reporting.RunClock()
    now[0] = 104.0
    clock.since("build", 100.0)
    for _ in range(2):
        clock.step({"time/generate_s": 30.0, "time/score_s": 0.2, "time/train_s": 20.0, "time/step_s": 51.0})
    clock.add("evaluation", 10.0)
    now[0] = 100.0 + 4 + 102 + 10 + 6
    assert clock.seconds["rollouts"] == 60.0 and clock.seconds["update"] == 40.0 and clock.steps == 2
    assert clock.summary() == ("time 2m02s for 2 steps: build 4.0s, evaluation 10.0s, rollouts 1m00s (30.00 s/step), "
                               "scoring 0.4s (0.20 s/step), update 40.0s (20.00 s/step), other 7.6s")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_step_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(caplog):
    from fasthint.reporting import StepProgress, duration

    metrics = {"reward/mean": 0.3125, "accuracy": 0.28125, "hint/rate": 0.0}
    term = _Terminal()
    bar = StepProgress(0, 4, "grpo", stream=term)
    with caplog.at_level(logging.INFO, logger="fasthint"):
        for step in bar:
            bar.update(step, metrics)
        assert "\r" in term.getvalue() and "reward=0.312" in term.getvalue() and not caplog.records
        file = io.StringIO()
        lines = StepProgress(1, 5, "grpo", every=2, stream=file)
        for step in lines:
            lines.update(step, metrics)
        quiet = StepProgress(0, 2, "grpo", enabled=False, stream=io.StringIO())
        for step in quiet:
            quiet.update(step, metrics)
    assert file.getvalue() == ""
    got = [r.getMessage() for r in caplog.records]
    assert [m.split(" (")[0] for m in got] == ["step 2/5 reward 0.312 acc 0.281 hint 0.00",
                                               "step 4/5 reward 0.312 acc 0.281 hint 0.00",
                                               "step 5/5 reward 0.312 acc 0.281 hint 0.00"]
    assert re.search(r"\(\d+\.\d s/step, eta \d+s\)$", got[0])
    assert [duration(s) for s in (4.4, 126, 3720, float("nan"))] == ["4s", "2m06s", "1h02m", "?"]
