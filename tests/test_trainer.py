"""HF engine log-probs and truncation; micro-batching with a global normaliser; zero-advantage skip."""
import copy

import pytest
import torch

from fasthint.batch import Sample
from fasthint.config import TrainConfig
from fasthint.data import render_prompt
from fasthint.engines.base import SamplingConfig
from fasthint.engines.hf import HFEngine
from fasthint.toy.model import build_model, build_tokenizer


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok, seed=0).eval()
    return model, tok


def _recompute_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)


def test_hf_engine_logprobs_order_and_truncation(toy):
    model, tok = toy
    engine = HFEngine(model, tok, batch_size=6)  # 2 prompts per generate call with n=3
    prompts = [render_prompt(tok, q) for q in ("1+2=?", "10+11-3=?", "5*5=?")]
    torch.manual_seed(1)
    comps = engine.generate(prompts, SamplingConfig(n=3, temperature=0.7, max_new_tokens=12))
    assert [c.prompt_index for c in comps] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for c in comps:
        assert 1 <= len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
        ends_eos = c.token_ids[-1] == tok.eos_token_id
        assert c.truncated == (not ends_eos) and tok.eos_token_id not in c.token_ids[:-1]
        ref = _recompute_logprobs(model, prompts[c.prompt_index], c.token_ids, 0.7)
        assert torch.allclose(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=1e-4)
    assert any(c.truncated for c in comps)  # an untrained model rarely stops within 12 tokens


@pytest.fixture(scope="module")
def varied():
    """A toy model with large random weights: its greedy outputs differ between prompts (the
    freshly initialised one repeats one token)."""
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model, tok


def _early_stopping_engine(model, tok, **kw):
    """Every 3rd token id also ends a sequence, so sequences stop at many different steps and the
    engine's drop-finished path runs."""
    engine = HFEngine(model, tok, **kw)
    engine.eos_ids = sorted(set(engine.eos_ids) | set(range(3, len(tok), 3)))
    return engine


def test_hf_engine_greedy_equals_transformers_generate_per_prompt(varied):
    model, tok = varied
    engine = _early_stopping_engine(model, tok)
    prompts = [render_prompt(tok, q) for q in ("1+2=?", "10+11-3+4=?", "7=?", "123*4-5=?", "2+2=?")]
    comps = engine.generate(prompts, SamplingConfig(n=2, temperature=0.0, max_new_tokens=10))
    lengths = {len(c.token_ids) for c in comps}
    assert len(lengths) > 1  # sequences finished at different steps
    for c in comps:  # reference: transformers' generate on the unpadded prompt alone
        ref = model.generate(torch.tensor([prompts[c.prompt_index]]), do_sample=False, max_new_tokens=10,
                             eos_token_id=engine.eos_ids, pad_token_id=engine.pad_id)[0, len(prompts[c.prompt_index]):]
        assert c.token_ids == ref.tolist()
        assert c.truncated == (c.token_ids[-1] not in engine.eos_ids)
        want = _recompute_logprobs(model, prompts[c.prompt_index], c.token_ids, 1.0)
        assert torch.allclose(torch.tensor(c.logprobs, dtype=torch.float64), want, atol=1e-4)


def test_hf_engine_sampling_with_early_stops_and_top_p(varied):
    model, tok = varied
    engine = _early_stopping_engine(model, tok, batch_size=8)
    prompts = [render_prompt(tok, q) for q in ("1+2=?", "10+11-3=?", "5*5=?")]
    torch.manual_seed(3)
    comps = engine.generate(prompts, SamplingConfig(n=4, temperature=0.8, top_p=0.9, max_new_tokens=12))
    assert [c.prompt_index for c in comps] == [0] * 4 + [1] * 4 + [2] * 4
    assert len({len(c.token_ids) for c in comps}) > 2
    eos = set(engine.eos_ids)
    for c in comps:  # log-probs at the sampling temperature, unaffected by which rows left the batch
        assert all(t not in eos for t in c.token_ids[:-1])
        want = _recompute_logprobs(model, prompts[c.prompt_index], c.token_ids, 0.8)
        assert torch.allclose(torch.tensor(c.logprobs, dtype=torch.float64), want, atol=1e-4)
        assert all(lp > -20 for lp in c.logprobs)


def test_hf_engine_greedy_is_deterministic_and_unpadded_equal(toy):
    model, tok = toy
    engine = HFEngine(model, tok)
    prompts = [render_prompt(tok, q) for q in ("1+2=?", "10+11-3+4=?")]  # different lengths: left padding
    sp = SamplingConfig(n=1, temperature=0.0, max_new_tokens=8)
    batched = engine.generate(prompts, sp)
    single = [engine.generate([p], sp)[0] for p in prompts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]


def _grads(model, samples, cfg):
    from fasthint.train import train_step

    m = copy.deepcopy(model).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stats = train_step(m, samples, cfg, opt, sched)
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, stats


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batching_equals_one_batch(toy, loss_agg):
    model, tok = toy
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(6):
        prompt = render_prompt(tok, f"{i}+{i}=?")
        comp = torch.randint(3, len(tok), (3 + 2 * i,), generator=g).tolist()
        old = (_recompute_logprobs(model, prompt, comp, 1.0) + 0.1 * torch.randn(len(comp), generator=g)).tolist()
        samples.append(Sample(prompt, comp, old, advantage=float(torch.randn((), generator=g))))
    cfg1 = TrainConfig(micro_batch_size=6, loss_agg=loss_agg, max_grad_norm=0.0).validate()
    cfg2 = TrainConfig(micro_batch_size=2, loss_agg=loss_agg, max_grad_norm=0.0).validate()
    g1, s1 = _grads(model, samples, cfg1)
    g2, s2 = _grads(model, samples, cfg2)
    assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-5, abs=1e-7)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], rtol=1e-4, atol=1e-7), name
    cfg3 = TrainConfig(micro_batch_size=6, micro_batch_tokens=60, loss_agg=loss_agg, max_grad_norm=0.0).validate()
    g5, s5 = _grads(model, samples, cfg3)  # a token budget cuts other micro-batches: same step
    assert s5["loss"] == pytest.approx(s1["loss"], rel=1e-5, abs=1e-7)
    for name in g1:
        assert torch.allclose(g1[name], g5[name], rtol=1e-4, atol=1e-7), name
    # zero-advantage samples are skipped (exactly 0 without KL) but still count in the normaliser
    zeroed = [Sample(s.prompt_ids, s.completion_ids, s.old_logprobs, 0.0) for s in samples[:3]] + samples[3:]
    g3, s3 = _grads(model, zeroed, cfg1)
    g4, _ = _grads(model, samples[3:], cfg1)
    assert s3["num_tokens/trained"] == sum(len(s.completion_ids) for s in samples[3:])
    scale = {"token-mean": sum(len(s.completion_ids) for s in zeroed) / sum(len(s.completion_ids) for s in samples[3:]),
             "seq-mean-token-mean": 6 / 3, "seq-mean-token-sum-norm": 6 / 3}[loss_agg]
    for name in g3:
        assert torch.allclose(g3[name] * scale, g4[name], rtol=1e-4, atol=1e-7), name


def test_toy_tokenizer_round_trip(tmp_path, toy):
    """The saved toy checkpoint reloads (AutoTokenizer) to the very same tokenization."""
    from transformers import AutoTokenizer

    model, tok = toy
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = '3+4=7\n7-2=5\n\\boxed{5} {"level_1": "x"}  é'
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(tok(text)["input_ids"]) == text
    assert render_prompt(loaded, "3+4=?") == render_prompt(tok, "3+4=?")
    assert tok.convert_tokens_to_ids("<|im_start|>") in render_prompt(tok, "x")
    assert len(tok(text)["input_ids"]) == len(text.encode())  # one token per byte


def test_token_budget_micro_batches():
    from fasthint.batch import make_micro_batches

    lens = [5, 40, 7, 12, 3, 30, 9, 90, 11]  # prompt 2 + completion
    samples = [Sample([1, 2], [3] * (n - 2), [0.0] * (n - 2), 1.0) for n in lens]
    mbs = make_micro_batches(samples, micro_batch_size=4, pad_id=0, max_tokens=48)
    shapes = [tuple(mb.input_ids.shape) for mb in mbs]
    assert sum(b for b, _ in shapes) == len(lens)  # every sample exactly once
    assert sorted(mb.num_seqs for mb in mbs) == sorted(b for b, _ in shapes)
    for b, L in shapes:
        assert b <= 4 and (b * L <= 48 or b == 1)  # 90 tokens alone is over the budget: its own batch
    assert (1, 90) in shapes and len(mbs) > len(make_micro_batches(samples, 4, 0))


def test_attn_implementation_auto(monkeypatch):
    import importlib.util

    from fasthint.models import resolve_attn_implementation

    assert resolve_attn_implementation("auto", torch.device("cpu")) == "sdpa"
    assert resolve_attn_implementation("eager", torch.device("cpu")) == "eager"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert resolve_attn_implementation("auto", torch.device("cuda")) == "flash_attention_2"
    assert resolve_attn_implementation("auto", torch.device("cpu")) == "sdpa"


def test_mismatch_and_clip_metrics_leave_hinted_tokens_out(toy):
    """A hinted completion trained in another context (Guide/HINT) has old log-probs far from the
    trainer's: sampling/logp_diff and clip_ratio cover the unhinted tokens only; entropy all of them."""
    model, tok = toy
    g = torch.Generator().manual_seed(3)
    samples, unhinted_diffs = [], []
    for i in range(4):
        prompt = render_prompt(tok, f"{i}+{i}=?")
        comp = torch.randint(3, len(tok), (4 + i,), generator=g).tolist()
        now = _recompute_logprobs(model, prompt, comp, 1.0)
        hinted = i % 2 == 1
        old = now - (5.0 if hinted else 0.05 * (i + 1))  # hinted: 5 nats off (ratio e^5, clipped)
        samples.append(Sample(prompt, comp, old.tolist(), advantage=1.0, hinted=hinted))
        if not hinted:
            unhinted_diffs += (now - old.float().double()).abs().tolist()
    cfg = TrainConfig(micro_batch_size=8, max_grad_norm=0.0).validate()
    _, stats = _grads(model, samples, cfg)
    assert stats["sampling/logp_diff/mean"] == pytest.approx(sum(unhinted_diffs) / len(unhinted_diffs), rel=1e-4)
    assert stats["sampling/logp_diff/max"] < 1.0 and stats["clip_ratio/high"] == 0.0
    assert stats["num_tokens/hinted"] == 5 + 7 and stats["num_tokens/trained"] == 4 + 5 + 6 + 7
    _, mixed = _grads(model, [Sample(s.prompt_ids, s.completion_ids, s.old_logprobs, 1.0) for s in samples], cfg)
    assert mixed["sampling/logp_diff/max"] > 4.9 and mixed["clip_ratio/high"] > 0.4  # unmarked: all tokens
    assert mixed["entropy"] == pytest.approx(stats["entropy"], rel=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(toy, tmp_path):
    """--gradient_checkpointing recomputes activations in backward: fp32 gradients equal to 1e-6, and
    the flag reaches the model through load_trainable_policy."""
    from fasthint.models import checkpoints_activations, enable_gradient_checkpointing, load_trainable_policy

    model, tok = toy
    g = torch.Generator().manual_seed(5)
    samples = []
    for i in range(3):
        prompt = render_prompt(tok, f"{i}+2=?")
        comp = torch.randint(3, len(tok), (5 + 3 * i,), generator=g).tolist()
        old = (_recompute_logprobs(model, prompt, comp, 1.0) - 0.1).tolist()
        samples.append(Sample(prompt, comp, old, advantage=(-1.0) ** i))
    cfg = TrainConfig(micro_batch_size=2, max_grad_norm=0.0).validate()
    plain, s1 = _grads(model, samples, cfg)
    ckpt = copy.deepcopy(model)
    enable_gradient_checkpointing(ckpt)
    assert checkpoints_activations(ckpt) and not checkpoints_activations(model)
    checked, s2 = _grads(ckpt, samples, cfg)
    assert s1["loss"] == pytest.approx(s2["loss"], abs=1e-7)
    for name, grad in plain.items():
        torch.testing.assert_close(checked[name], grad, rtol=1e-6, atol=1e-6, msg=name)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    policy, _ = load_trainable_policy(str(tmp_path / "m"), torch.device("cpu"), "eager", gradient_checkpointing=True)
    assert checkpoints_activations(policy.lm) and not policy.lm.config.use_cache
