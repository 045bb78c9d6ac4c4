"""The engine/trainer agreement check (``fasthint.engines.sync_check``, issue 28): after a weight sync
the engine's sampling log-probs are compared with the trainer's; an engine that samples from other
weights stops the run with one line. The engine here is the HF engine sampling from a *copy* of the
policy, so that a sync can be planted wrong (the vLLM leg: tests/test_vllm.py)."""
import copy

import pytest
import torch

import fasthint
from fasthint.engines.base import SamplingConfig
from fasthint.engines.hf import HFEngine
from fasthint.engines.sync_check import SyncCheckedEngine
from fasthint.errors import FastHintError
from fasthint.toy.model import build_model, build_tokenizer
from fasthint.data import render_prompt


class CopyEngine:
    """Samples from its own copy of the weights, like vLLM; ``skip`` names parameters its sync leaves out."""

    runs_policy = False

    def __init__(self, model, tok, skip=()):
        self.copy, self.tok, self.skip = copy.deepcopy(model), tok, skip
        self.inner = HFEngine(self.copy, tok)

    def generate(self, prompts, sampling):
        return self.inner.generate(prompts, sampling)

    def sleep(self):
        pass

    def close(self):
        pass

    def update_weights(self, model):
        with torch.no_grad():
            src = dict(model.named_parameters())
            for name, p in self.copy.named_parameters():
                if not any(s in name for s in self.skip):
                    p.copy_(src[name])


@pytest.fixture(scope="module")
def toy():
    tok = build_tokenizer()
    torch.manual_seed(0)
    return build_model(tok, seed=0).eval(), tok


def _roll(engine, tok, temperature=1.0):
    prompts = [render_prompt(tok, q) for q in ("1+2=?", "3+4=?")]
    return engine.generate(prompts, SamplingConfig(n=2, temperature=temperature, max_new_tokens=8))


def _cfg(**kw):
    return fasthint.TrainConfig(**kw).validate()


def test_agreeing_engine_passes_and_reports(toy):
    model, tok = toy
    eng = SyncCheckedEngine(CopyEngine(model, tok), _cfg(), every_sync=True)
    _roll(eng, tok)
    out = eng.verify(model, step=1)
    assert 0 <= out["sampling/sync_check/logp_diff"] < 1e-5  # same weights, same code: rounding only
    assert eng.verify(model, step=1) == {}  # once per sync


def test_a_sync_that_skips_a_layer_stops_the_run(toy):
    model, tok = toy
    moved = copy.deepcopy(model)
    eng = SyncCheckedEngine(CopyEngine(model, tok, skip=("layers.1.",)), _cfg(), every_sync=True)
    with torch.no_grad():  # the trainer's step moved every weight (a large step: the toy's layer must matter)
        for p in moved.parameters():
            p.add_(0.3 * torch.randn_like(p))
    eng.update_weights(moved)
    _roll(eng, tok)
    with pytest.raises(FastHintError) as e:
        eng.verify(moved, step=2)
    msg = str(e.value)
    assert "\n" not in msg and "after the weight sync of step 1" in msg and "--engine_sync_max_logp_diff" in msg


def test_only_due_checks_keep_samples(toy):
    model, tok = toy
    eng = SyncCheckedEngine(CopyEngine(model, tok), _cfg(), every_sync=False)
    _roll(eng, tok, temperature=0.0)  # a greedy hint request: its log-probs are not the loss's
    assert eng.kept == []
    _roll(eng, tok)
    assert 0 < sum(len(s.completion_ids) for s in eng.kept) <= 2048
    eng.verify(model, step=1)
    eng.update_weights(model)  # without --check_engine_sync only the first sync is checked
    _roll(eng, tok)
    assert eng.kept == [] and eng.verify(model, step=2) == {}


def test_the_loop_stops_on_a_wrong_sync(tmp_path, monkeypatch):
    """The training loop with ``--check_engine_sync``: a planted engine whose sync loads nothing passes
    the first check (built from the same weights) and is caught at step 2, once step 1 moved the
    policy; the metrics of step 1 stay written. (``main`` turns the error into one line, exit 2.)"""
    import json

    import fasthint.build as build_mod

    monkeypatch.setattr(build_mod, "make_engine", lambda cfg, model, tok, *a, **k: CopyEngine(model, tok, skip=("",)))
    cfg = fasthint.TrainConfig(max_steps=3, output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                               eval_data="", prompts_per_step=4, num_generations=4, max_new_tokens=8,
                               learning_rate=1e-2, progress_bar=False, save_steps=0, check_engine_sync=True)
    with pytest.raises(FastHintError, match="after the weight sync of step 1"):
        fasthint.fit(cfg, reward_fn=lambda text, row: float(sum(map(ord, text)) % 2 == 0))
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1]
    assert rows[0]["sampling/sync_check/logp_diff"] < 1e-5  # the first check: the same weights
