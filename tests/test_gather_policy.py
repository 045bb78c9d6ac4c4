"""The trainer gathers the sharded policy whole only where something runs it (issue 28: with vLLM
sampling, GRPO and SAGE had the 7B policy gathered around samples(), ~15 GB for nothing). One process
runs the real loop with the HF engine marked as keeping its own weights (as vLLM does) and every
``dist.gathered`` call recorded: the rollout needs no gather, and samples() needs one only for an
algorithm that declares it runs the policy there."""
import contextlib
import sys

import pytest

import fasthint
import fasthint.train as train_mod
from fasthint.algorithms import REGISTRY
from fasthint.engines.hf import HFEngine


@pytest.mark.parametrize("algo", ["grpo", "guide"])
def test_samples_gather_the_policy_only_when_the_algorithm_runs_it(tmp_path, monkeypatch, algo):
    calls = []

    @contextlib.contextmanager
    def recording(policy, enabled=True):
        if sys._getframe(2).f_code.co_name == "_fit":  # the loop's own gathers (not evaluation's, update's)
            calls.append(enabled)
        yield

    monkeypatch.setattr(train_mod.dist, "gathered", recording)
    monkeypatch.setattr(HFEngine, "sleep", lambda self: calls.append("sleep"), raising=False)
    monkeypatch.setattr(HFEngine, "runs_policy", False)  # like vLLM: rollouts need no gathered policy
    cfg = fasthint.TrainConfig(algo=algo, max_steps=2, output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                               toy_warmstart_steps=0, toy_train_size=40, eval_data="", prompts_per_step=4,
                               num_generations=4, max_new_tokens=8, progress_bar=False, save_steps=0)
    fasthint.fit(cfg, reward_fn=lambda text, row: 0.0)  # every group fails: Guide hints and rescores
    # each step: rollout; vLLM's sleep before samples() (Guide's forwards then run beside no engine cache);
    # samples() gathered on step 1 for every algorithm (the engine/trainer agreement check after the first
    # sync, engines.sync_check), then only for an algorithm that runs the policy there
    own = REGISTRY[algo].samples_run_policy
    assert calls == [False, "sleep", True, False, "sleep", own]
    assert REGISTRY[algo].samples_run_policy == (algo == "guide")


def test_only_the_hinted_resamplers_run_the_policy_in_samples():
    assert sorted(n for n, cls in REGISTRY.items() if cls.samples_run_policy) == ["guide", "hint"]
