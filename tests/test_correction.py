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


def _want(d: list[float], mode: str, cap: float) -> list[float]:
    """TRL's four modes written out on float64 log-ratios (trainer - sampler) of one completion."""
    r = [math.exp(x) for x in d] if mode.startswith("token") else [math.exp(sum(d))] * len(d)
    return [min(x, cap) if mode.endswith("truncate") else (0.0 if x > cap else x) for x in r]


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_is_weights_in_trls_four_modes(mode):
    """Issue 31: token or sequence, truncate or mask, against the hand computation on hand-built log-probs."""
    tr = torch.tensor([-1.0, -2.0, -0.5, -0.1], dtype=torch.float64)
    for sa in (torch.tensor([-1.5, -1.0, -0.5, -0.3], dtype=torch.float64),  # token ratios e^.5, e^-1, 1, e^.2
               torch.tensor([-2.5, -2.2, -0.6, -0.2], dtype=torch.float64)):  # sequence ratio e^1.9 > 1.5
        got = is_weights(tr, sa, mode, 1.5)
        assert got.tolist() == pytest.approx(_want((tr - sa).tolist(), mode, 1.5), rel=1e-12)
    assert is_weights(tr, tr - 800.0, mode, 2.0).isfinite().all()  # a long sequence's product never overflows
    with pytest.raises(ValueError):
        is_weights(tr, tr, "token", 2.0)  # the old level name is not a mode


def test_the_old_level_option_maps_to_a_mode_with_one_warning(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="fasthint"):
        cfg = TrainConfig(engine="vllm", vllm_importance_sampling_level="sequence").validate()
    assert cfg.vllm_importance_sampling_mode == "sequence_truncate" and cfg.vllm_importance_sampling_level == ""
    assert caplog.text.count("is now --vllm_importance_sampling_mode sequence_truncate") == 1
    assert TrainConfig().validate().vllm_importance_sampling_mode == "token_truncate"  # the default
    with pytest.raises(ConfigError, match="both given"):
        TrainConfig(vllm_importance_sampling_level="token", vllm_importance_sampling_mode="token_mask").validate()
    with pytest.raises(ConfigError, match="vllm_importance_sampling_mode"):
        TrainConfig(vllm_importance_sampling_mode="token").validate()


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


@pytest.mark.parametrize("mode,shift", [("token_truncate", 0.3), ("token_truncate", -1.0), ("sequence_truncate", 0.05),
                                        ("token_mask", -1.0), ("sequence_mask", -0.2)])
def test_corrected_engine_rescores_with_the_trainer(mode, shift):
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok, seed=0).eval()
    cfg = TrainConfig(micro_batch_size=3, temperature=0.8, engine="vllm", vllm_importance_sampling_correction=True,
                      vllm_importance_sampling_mode=mode, vllm_importance_sampling_cap=2.0).validate()
    inner = _Shifted(HFEngine(model, tok), shift)
    eng = ISCorrectedEngine(inner, model, cfg)
    prompts = [render_prompt(tok, q) for q in ("1+2=?", "10+11-3=?")]
    comps = eng.generate(prompts, SamplingConfig(n=3, temperature=0.8, max_new_tokens=10))
    n = masked = 0
    for c, sampled in zip(comps, inner.truth):
        want = _trainer_logprobs(model, prompts[c.prompt_index], c.token_ids, 0.8)
        assert (torch.tensor(c.logprobs, dtype=torch.float64) - want).abs().max() < 1e-4  # the trainer's now
        d = want - (torch.tensor(sampled, dtype=torch.float64) + shift)  # trainer - sampler
        w = torch.tensor(_want(d.tolist(), mode, 2.0), dtype=torch.float64)
        assert torch.tensor(c.is_weights, dtype=torch.float64).sub(w).abs().max() < 1e-3
        masked += int((w == 0).sum()) if mode.endswith("mask") else 0
        n += len(c.token_ids)
    st = merge_stats([eng.pop_stats()])
    assert st["sampling/logp_diff/mean"] == pytest.approx(abs(shift), abs=1e-4)
    if mode == "token_truncate":
        assert st["sampling/is_capped_frac"] == (1.0 if math.exp(-shift) > 2 else 0.0)
    assert st["sampling/is_masked_frac"] == pytest.approx(masked / n) and (masked > 0) == mode.endswith("mask")
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
