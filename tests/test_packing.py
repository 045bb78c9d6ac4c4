"""Padding-free micro-batches (--padding_free): packed rows give the padded path's log-probs and
gradients, fill a token budget, and leave generation untouched."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from fasthint.batch import Sample, make_micro_batches
from fasthint.config import TrainConfig
from fasthint.errors import ModelError
from fasthint.loss import micro_batch_logprobs, recompute_logprobs
from fasthint.models import trainer_attention
from fasthint.packing import VARLEN_SDPA
from fasthint.update import OptimConfig, train_step


def _model(attn: str, dtype=torch.float32, seed: int = 0):
    """A tiny Qwen2 with grouped-query attention (4 heads, 2 KV heads) and an odd vocabulary."""
    cfg = Qwen2Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)


def _samples(n=7, seed=0, spread=(3, 40)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(2, 9, (), generator=g))
        c = int(torch.randint(*spread, (), generator=g))
        out.append(Sample(torch.randint(1, 101, (p,), generator=g).tolist(),
                          torch.randint(1, 101, (c,), generator=g).tolist(),
                          (-1.5 - torch.rand(c, generator=g)).tolist(), float(torch.randn((), generator=g)),
                          group=i // 2))
    return out


def _logp_ref(model, samples):
    """float64, one sequence at a time, no padding anywhere: the independent reference."""
    m = copy.deepcopy(model).double()
    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.completion_ids])
            logits = m(input_ids=ids).logits[0, len(s.prompt_ids) - 1:-1]
            out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.completion_ids)[:, None]).squeeze(-1))
    return torch.cat(out)


@pytest.mark.parametrize("budget", [0, 64])
def test_packed_logprobs_equal_padded_and_float64(budget):
    model = _model(VARLEN_SDPA).eval()
    samples = _samples()
    want = _logp_ref(model, samples)
    for packed in (False, True):
        mbs = make_micro_batches(samples, 3, 0, max_tokens=budget, packed=packed)
        assert all(mb.packed == packed for mb in mbs)
        got = {}
        for mb in mbs:
            lp = micro_batch_logprobs(model, mb, 1.0, autocast=False)
            for sid, chunk in zip(range(mb.num_seqs), lp.split(torch.bincount(mb.seq_ids).tolist())):
                got[tuple(mb.targets[mb.seq_ids == sid].tolist())] = chunk
        lp = torch.cat([got[tuple(s.completion_ids)] for s in samples]).double()
        assert (lp - want).abs().max().item() < 1e-5, packed


def test_packed_micro_batches_fill_the_token_budget():
    samples = _samples(n=20, spread=(5, 60))
    mbs = make_micro_batches(samples, 8, 0, max_tokens=128, packed=True)
    lens = sorted(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    assert sorted(n for mb in mbs for n in torch.diff(mb.cu_seq_lens).tolist()) == lens
    assert all(mb.num_input_tokens <= 128 and mb.num_seqs <= 8 for mb in mbs)
    assert len(mbs) <= -(-sum(lens) // 128) + 1  # first-fit decreasing: at most one bin over the bound
    for mb in mbs:  # positions restart at every boundary
        starts = mb.cu_seq_lens[:-1].tolist()
        assert all(mb.position_ids[0, s].item() == 0 for s in starts)
        assert mb.position_ids.shape == mb.input_ids.shape and mb.attention_mask is None
    padded = make_micro_batches(samples, 8, 0, max_tokens=128)
    assert sum(mb.num_input_tokens for mb in padded) > sum(lens)  # padding
    one = make_micro_batches(samples[:1], 8, 0, max_tokens=4, packed=True)  # longer than the budget: alone
    assert len(one) == 1


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_train_step_packed_equals_padded(loss_agg):
    """Same loss, metrics and gradients (fp32, 1e-5) through the fused loss and backward, with the
    token budget cutting the batch differently in the two layouts."""
    model = _model(VARLEN_SDPA)
    samples = _samples(n=9)
    out = {}
    for packed in (False, True):
        cfg = TrainConfig(micro_batch_size=4, micro_batch_tokens=96, padding_free=packed, loss_agg=loss_agg,
                          max_grad_norm=0.0).validate()
        m = copy.deepcopy(model).train()
        opt, sched = OptimConfig.build(cfg, m.parameters())
        opt.param_groups[0]["lr"] = 0.0
        stats = train_step(m, samples, cfg, opt, sched)
        out[packed] = stats, {n: p.grad for n, p in m.named_parameters()}
    (s0, g0), (s1, g1) = out[False], out[True]
    assert s1["loss"] == pytest.approx(s0["loss"], rel=1e-5)
    assert s1["entropy"] == pytest.approx(s0["entropy"], rel=1e-5)
    assert s1["num_tokens/trained"] == s0["num_tokens/trained"]
    assert s1["num_tokens/padding_frac"] == 0.0 < s0["num_tokens/padding_frac"]
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


def test_recompute_logprobs_packed_equals_padded():
    model = _model(VARLEN_SDPA).eval()
    samples = _samples()
    a = recompute_logprobs(model, samples, TrainConfig(micro_batch_size=3, padding_free=False).validate())
    b = recompute_logprobs(model, samples, TrainConfig(micro_batch_size=3, padding_free=True).validate())
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


def test_varlen_model_generates_like_sdpa():
    """Rollouts (KV cache, left padding) never pack: the packing attention is plain sdpa there."""
    a, b = _model(VARLEN_SDPA).eval(), _model("sdpa").eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a.generate(ids, **kw), b.generate(ids, **kw))


def test_models_that_cannot_pack_are_refused():
    assert trainer_attention("sdpa", False) == "sdpa"
    assert trainer_attention("sdpa", True) == VARLEN_SDPA
    assert trainer_attention("flash_attention_2", True) == "flash_attention_2"
    with pytest.raises(ModelError, match="--padding_free false"):
        trainer_attention("eager", True)  # e.g. Gemma-2 without flash-attn


@pytest.mark.parametrize("packed", [False, True])
def test_recompute_logprobs_caps_tokens(monkeypatch, packed):
    """The no-grad recompute is capped by --micro_batch_tokens like the update's micro-batches (it was
    cut by sequence count only: 64 sequences of 10k tokens in one forward), in order, same values."""
    import fasthint.loss as loss_mod

    model = _model(VARLEN_SDPA).eval()
    samples = _samples()
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in samples]
    cap = max(lengths) + 1
    seen = []
    real = loss_mod.micro_batch_logprobs
    monkeypatch.setattr(loss_mod, "micro_batch_logprobs",
                        lambda lm, mb, *a: seen.append(mb.input_ids.numel()) or real(lm, mb, *a))
    uncapped = recompute_logprobs(model, samples, TrainConfig(micro_batch_size=64, padding_free=packed).validate())
    assert seen == [mb for mb in seen[:1]] and seen[0] > cap  # one forward of everything before
    seen.clear()
    capped = recompute_logprobs(model, samples, TrainConfig(micro_batch_size=64, micro_batch_tokens=cap,
                                                            padding_free=packed).validate())
    assert len(seen) > 1 and max(seen) <= cap
    assert len(capped) == len(samples)
    for x, y, s in zip(uncapped, capped, samples):
        assert len(y) == len(s.completion_ids)
        torch.testing.assert_close(y, x, rtol=0, atol=1e-5)
