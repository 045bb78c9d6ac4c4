"""Checkpoints and exact resume: safetensors/JSON round trips, atomic saves, a SIGKILLed run resumed."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO
from fasthint.checkpoint import (find_resume, list_checkpoints, load_optimizer_files, move_aside, optimizer_files,
                                 prune_checkpoints, restore_rng, rng_files, truncate_metrics)
from fasthint.config import TrainConfig
from fasthint.errors import ConfigError


def _stepped_adamw():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(3):
        model(torch.randn(5, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_optimizer_round_trip_continues_identically(tmp_path):
    from safetensors.torch import load_file, save_file

    model, opt = _stepped_adamw()
    tensors, meta = optimizer_files(opt)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "o.safetensors"))
    meta = json.loads(json.dumps(meta))  # what the checkpoint holds
    twin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    twin.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(twin.parameters(), lr=1.0)  # hyper-parameters come from the checkpoint
    load_optimizer_files(opt2, load_file(str(tmp_path / "o.safetensors")), meta)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and opt2.param_groups[0]["lr"] == 0.01
    x = torch.randn(5, 3)
    for m, o in ((model, opt), (twin, opt2)):
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_rng_round_trip():
    tensors, meta = rng_files()
    meta = json.loads(json.dumps(meta))
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(tensors, meta)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def _fake_ckpt(root, step, complete=True, config=None):
    p = root / f"checkpoint-{step}"
    p.mkdir(parents=True)
    if complete:
        (p / "trainer_state.json").write_text(json.dumps({"step": step, "config": config or {}}))
    return p


def test_interrupted_saves_are_ignored_and_pruned(tmp_path):
    _fake_ckpt(tmp_path, 2)
    _fake_ckpt(tmp_path, 4)
    _fake_ckpt(tmp_path, 6, complete=False)       # renamed in place only when complete: cannot happen,
    (tmp_path / ".checkpoint-6.tmp123").mkdir()   # but a killed save leaves a hidden temp directory
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 4]
    cfg = TrainConfig(output_dir=str(tmp_path)).validate()
    assert find_resume(cfg) == str(tmp_path / "checkpoint-4")
    prune_checkpoints(str(tmp_path), keep=1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-6"]


def test_resume_refuses_other_settings_and_bad_paths(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path)).validate()
    _fake_ckpt(tmp_path, 3, config={**vars(cfg), "algo": "sage", "max_steps": 99})
    with pytest.raises(ConfigError, match=r"other settings \(--algo 'sage' -> 'grpo'\)"):
        find_resume(cfg)
    assert find_resume(TrainConfig(output_dir=str(tmp_path), resume="none").validate()) is None
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        find_resume(TrainConfig(resume=str(tmp_path / "nowhere")).validate())


def test_fresh_run_moves_old_metrics_and_checkpoints_aside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    _fake_ckpt(tmp_path, 5)
    move_aside(str(tmp_path))
    names = os.listdir(tmp_path)
    assert "metrics.jsonl" not in names and not list_checkpoints(str(tmp_path))
    moved = [n for n in names if n.startswith("checkpoints.")]
    assert len(moved) == 1 and os.listdir(tmp_path / moved[0]) == ["checkpoint-5"]
    assert any(n.startswith("metrics.") and n.endswith(".jsonl") for n in names)


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    truncate_metrics(str(p), 2)
    assert [json.loads(line)["step"] for line in p.read_text().splitlines()] == [1, 2]


TIME_KEYS = ("time/", "tokens_per_s")


def _train_cmd(out, cache, steps, algo):
    return [sys.executable, os.path.join(REPO, "tests", "fit_toy_reward.py"), "--output_dir", str(out),
            "--cache_dir", str(cache),
            "--toy_warmstart_steps", "0", "--toy_train_size", "12", "--eval_data", "", "--prompts_per_step", "3",
            "--num_generations", "4", "--max_new_tokens", "8", "--max_steps", str(steps), "--save_steps", "1",
            "--save_total_limit", "2", "--progress_bar", "false", "--algo", algo, "--num_threads", "1",
            "--hint_provider", "solution", "--sage_light_min_acc", "0.5", "--sage_light_max_acc", "0.9"]


def _rows(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if not k.startswith(TIME_KEYS)} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "sage_light"])
def test_sigkilled_run_resumes_exactly(tmp_path, algo):
    """Steps after the checkpoint log the same metrics as an uninterrupted run (same seed): same
    data order, sampling RNG, optimizer and scheduler state, algorithm state (SAGE-light levels)."""
    steps, cache = 6, tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "kernels")])}
    ref = subprocess.run(_train_cmd(tmp_path / "ref", cache, steps, algo), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(out, cache, steps, algo), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-2" / "trainer_state.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = list_checkpoints(str(out))
    assert done and done[-1][0] < steps, "the run finished before it could be killed"
    res = subprocess.run(_train_cmd(out, cache, steps, algo), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming from {done[-1][1]} at step {done[-1][0]}" in res.stderr
    a, b = _rows(tmp_path / "ref"), _rows(out)
    assert sum(r["grad_norm"] > 0 for r in a) >= steps // 2  # real updates (not all-equal rewards)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        assert rb.keys() == ra.keys()
        for k in ra:
            same = (rb[k] is None) if ra[k] is None else rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-9)
            assert same, (ra["step"], k)
    if algo == "sage_light":
        sa = json.load(open(tmp_path / "ref" / "final" / "algorithm_state.json"))
        sb = json.load(open(out / "final" / "algorithm_state.json"))
        assert sa == sb and any(v > 0 for v in sa["levels"].values())  # levels were used and restored
    assert len(list_checkpoints(str(out))) == 2  # save_total_limit
