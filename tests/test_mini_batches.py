"""Several optimiser steps per rollout batch (--steps_per_generation, --num_iterations): mini-batches of
whole groups, the trainer's recompute of the old log-probs, and equality with one step when both are 1."""
import copy

import pytest
import torch

import fasthint.update as update
from fasthint.batch import Sample, split_mini_batches
from fasthint.config import TrainConfig
from fasthint.data import render_prompt
from fasthint.toy.model import build_model, build_tokenizer


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    tok = build_tokenizer()
    return build_model(tok, seed=0).eval(), tok


def _logp(model, prompt, completion):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def _samples(model, tok, groups=4, per_group=3, noise=0.3):
    """Groups of completions whose old log-probs are the model's plus noise (a sampler that differs)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for gi in range(groups):
        prompt = render_prompt(tok, f"{gi}+{gi}=?")
        adv = torch.randn(per_group, generator=g)
        adv = (adv - adv.mean()).tolist()
        for k in range(per_group):
            comp = torch.randint(3, len(tok), (4 + 3 * k + gi,), generator=g).tolist()
            old = _logp(model, prompt, comp) + noise * torch.randn(len(comp), generator=g, dtype=torch.float64)
            out.append(Sample(prompt, comp, old.tolist(), adv[k], group=gi))
    return out


def _run(model, samples, steps=None, **kw):
    cfg = TrainConfig(learning_rate=kw.pop("learning_rate", 3e-2), micro_batch_size=4, **kw).validate()
    m = copy.deepcopy(model).train()
    opt, sched = update.OptimConfig.build(cfg, m.parameters())
    samples = copy.deepcopy(samples)
    stats = (update.policy_update if steps is None else steps)(m, samples, cfg, opt, sched)
    return m, stats, samples, sched


def test_split_mini_batches_keeps_groups_whole_and_balanced(toy):
    model, tok = toy
    samples = _samples(model, tok, groups=5, per_group=2)
    parts = split_mini_batches(samples, 2)
    assert [len(p) for p in parts] == [4, 6]  # 2 and 3 groups
    assert [s for p in parts for s in p] == samples
    assert {s.group for s in parts[0]}.isdisjoint({s.group for s in parts[1]})
    parts = split_mini_batches(samples[:2], 3)  # one group, three steps: two are empty
    assert sorted(len(p) for p in parts) == [0, 0, 2]


def test_one_step_one_pass_is_exactly_train_step(toy):
    model, tok = toy
    samples = _samples(model, tok)
    m1, s1, _, _ = _run(model, samples)
    m2, s2, _, _ = _run(model, samples, steps=update.train_step)
    assert s1 == s2
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n


def test_two_steps_per_generation_recompute_then_clip(toy, monkeypatch):
    """The trainer recomputes the old log-probs (the first step's ratio is 1 up to float rounding),
    each step trains one half of the groups, and the second step's ratio has moved: clipping acts."""
    model, tok = toy
    samples = _samples(model, tok)
    steps = []
    real = update.train_step

    def spy(policy, mini, *a, **k):
        steps.append(([s.group for s in mini], real(policy, mini, *a, **k)))
        return steps[-1][1]

    monkeypatch.setattr(update, "train_step", spy)
    m, stats, trained, sched = _run(model, samples, steps_per_generation=2)
    assert [sorted(set(g)) for g, _ in steps] == [[0, 1], [2, 3]]
    assert sched.last_epoch == 2  # two optimiser (and scheduler) steps
    for s in trained:  # old log-probs: the policy before the update, not the noisy sampler's
        assert torch.allclose(torch.tensor(s.old_logprobs, dtype=torch.float64),
                              _logp(model, s.prompt_ids, s.completion_ids), atol=1e-5)
    first, second = steps[0][1], steps[1][1]
    assert first["sampling/logp_diff/max"] < 1e-5  # ratio 1 on the first step
    assert first["clip_ratio/low"] == 0.0 and first["clip_ratio/high"] == 0.0
    assert second["sampling/logp_diff/max"] > 0.05  # the first step moved the policy
    assert second["clip_ratio/low"] + second["clip_ratio/high"] > 0.0
    # reported: the sampler mismatch of the recompute (the noise), and the policy's drift per step
    assert stats["sampling/logp_diff/mean"] == pytest.approx(0.3 * (2 / torch.pi) ** 0.5, rel=0.25)
    assert stats["policy/logp_diff/max"] == pytest.approx(second["sampling/logp_diff/max"])
    assert stats["num_tokens/trained"] == sum(len(s.completion_ids) for s in trained if s.advantage != 0)


def test_num_iterations_passes_over_the_batch_and_keeps_behaviour_logprobs(toy, monkeypatch):
    model, tok = toy
    samples = _samples(model, tok, groups=2)
    samples[0].keep_old_logprobs = True  # e.g. Guide's hinted completion: pi_old(o | q, hint)
    seen = []
    real = update.train_step
    monkeypatch.setattr(update, "train_step", lambda p, mini, *a, **k: seen.append(len(mini)) or real(p, mini, *a, **k))
    _, stats, trained, sched = _run(model, samples, num_iterations=3)
    assert seen == [len(samples)] * 3 and sched.last_epoch == 3
    assert trained[0].old_logprobs == samples[0].old_logprobs
    assert trained[1].old_logprobs != samples[1].old_logprobs


@pytest.mark.parametrize("flag", ["steps_per_generation", "num_iterations"])
def test_settings_are_checked(flag):
    from fasthint.errors import ConfigError

    with pytest.raises(ConfigError, match=f"--{flag}"):
        TrainConfig(**{flag: 0}).validate()
