"""Truncated importance sampling (fasthint.engines.correction): the weights against float64 formulas,
the re-scoring engine against an independent forward, and the weights reaching the loss."""
import math

import pytest
import torch

from fasthint.batch import Sample, make_micro_batches
from fasthint.config import TrainConfig
from fasthint.data import render_prompt
from fasthint.engines.base import Completion, SamplingConfig
from fasthint.engines.correction import ISCorrectedEngine, is_weights, merge_stats
from fasthint.engines.hf import HFEngine
from fasthint.errors import ConfigError
from fasthint.toy.model import build_model, build_tokenizer


def test_is_weights_token_and_sequence_levels():
    tr = torch.tensor([-1.0, -2.0, -0.5])
    sa = torch.tensor([-1.5, -1.0, -0.5])
    got = is_weights(tr, sa, "token", 1.5)
    want = [min(math.exp(d), 1.5) for d in (0.5, -1.0, 0.0)]
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    seq = is_weights(tr, sa, "sequence", 2.0)
    assert seq.tolist() == pytest.approx([math.exp(-0.5)] * 3, rel=1e-12)
    assert is_weights(tr, sa - 1.0, "sequence", 2.0).tolist() == pytest.approx([2.0] * 3)  # exp(2.5) capped
    with pytest.raises(ValueError):
        is_weights(tr, sa, "batch", 2.0)


class _Shifted:
    """An engine whose reported log-probs are the HF engine's plus ``shift`` (a stand-in for a sampler
    that disagrees with the trainer)."""

    def __init__(self, inner, shift):
        self.inner, self.shift = inner, shift

    def generate(self, prompts, sampling):
        out = self.inner.generate(prompts, sampling)
        self.truth = [list(c.logprobs) for c in out]
        return [Completion(c.prompt_index, c.token_ids, [x + self.shift for x in c.logprobs], c.truncated) for c in out]


def _trainer_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize("level,shift", [("token", 0.3), ("token", -1.0), ("sequence", 0.05)])
def test_corrected_engine_rescores_with_the_trainer(level, shift):
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok, seed=0).eval()
    cfg = TrainConfig(micro_batch_size=3, temperature=0.8, engine="vllm", vllm_importance_sampling_correction=True,
                      vllm_importance_sampling_level=level, vllm_importance_sampling_cap=2.0).validate()
    inner = _Shifted(HFEngine(model, tok), shift)
    eng = ISCorrectedEngine(inner, model, cfg)
    prompts = [render_prompt(tok, q) for q in ("1+2=?", "10+11-3=?")]
    comps = eng.generate(prompts, SamplingConfig(n=3, temperature=0.8, max_new_tokens=10))
    n = 0
    for c, sampled in zip(comps, inner.truth):
        want = _trainer_logprobs(model, prompts[c.prompt_index], c.token_ids, 0.8)
        assert (torch.tensor(c.logprobs, dtype=torch.float64) - want).abs().max() < 1e-4  # the trainer's now
        d = want - (torch.tensor(sampled, dtype=torch.float64) + shift)  # trainer - sampler
        w = torch.exp(d).clamp(max=2.0) if level == "token" else torch.full_like(d, min(math.exp(d.sum()), 2.0))
        assert torch.tensor(c.is_weights, dtype=torch.float64).sub(w).abs().max() < 1e-3
        n += len(c.token_ids)
    st = merge_stats([eng.pop_stats()])
    assert st["sampling/logp_diff/mean"] == pytest.approx(abs(shift), abs=1e-4)
    if level == "token":
        assert st["sampling/is_capped_frac"] == (1.0 if math.exp(-shift) > 2 else 0.0)
    assert eng.pop_stats()["n"] == 0  # reset


def test_tis_weights_travel_apart_from_the_sample_weight():
    s = [Sample([1, 2], [3, 4, 5], [0.0] * 3, 1.0, weight=0.5, token_weights=[1.0, 2.0, 0.25]),
         Sample([1], [6], [0.0], -1.0)]
    mb, = make_micro_batches(s, 4, 0)  # sorted by length: the one-token sample first
    assert mb.weights.tolist() == [1.0, 0.5, 0.5, 0.5]
    assert mb.is_weights.tolist() == [1.0, 1.0, 2.0, 0.25]
    mb, = make_micro_batches(s[1:], 4, 0)
    assert mb.is_weights is None


def test_tis_weight_scales_the_policy_gradient_term_only_float64():
    """loss_t = -w_t min(r A, clip(r) A) + beta k3_t, token-mean; w on the PG term, never on the KL."""
    from fasthint.loss import policy_loss

    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-1.2, -1.5, -0.5, -2.0], dtype=torch.float64)
    ref = torch.tensor([-0.9, -2.2, -0.7, -2.5], dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0], dtype=torch.float64)
    isw = torch.tensor([0.5, 3.0, 1.0, 2.0], dtype=torch.float64)
    loss, _ = policy_loss(logp, old, adv, torch.ones(4), ref_logp=ref, beta=0.1, token_fields={"is_weight": isw})
    (grad,) = torch.autograd.grad(loss, logp)
    want, want_grad = 0.0, []
    for lp, o, rf, a, w in zip(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), isw.tolist()):
        r = math.exp(lp - o)
        clipped = min(max(r, 0.8), 1.28)
        obj = min(r * a, clipped * a)
        d = rf - lp
        want += (-w * obj + 0.1 * (math.exp(d) - d - 1)) / 4
        d_obj = r * a if r * a <= clipped * a else (clipped * a if r == clipped else 0.0)  # d obj / d logp
        want_grad.append((-w * d_obj + 0.1 * (1 - math.exp(d))) / 4)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert torch.allclose(grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-10, atol=1e-14)


def test_correction_needs_the_vllm_engine():
    with pytest.raises(ConfigError, match="needs --engine vllm"):
        TrainConfig(vllm_importance_sampling_correction=True).validate()
    with pytest.raises(ConfigError, match="cap must be >= 1"):
        TrainConfig(engine="vllm", vllm_importance_sampling_cap=0.5).validate()
