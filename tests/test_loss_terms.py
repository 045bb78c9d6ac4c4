"""The objective's pluggable terms (fasthint.loss): a term written as docs/ARCHITECTURE.md shows runs
through every head path and the training step, and the built-in terms compose as the kernels' old
fixed signature did."""
from __future__ import annotations

import re

import pytest
import torch

from fasthint.algorithms import REGISTRY, make_algorithm
from fasthint.config import TrainConfig
from fasthint.loss import ClippedSurrogate, KLPenalty, ShapedRatio, clip_terms, fused_policy_loss, policy_loss
from fasthint_kernels.reference import linear_logprobs_ref, policy_loss_ref

from conftest import REPO, cpu_head_impls

TEMP = 0.7


@pytest.fixture
def example():
    """The python block of docs/ARCHITECTURE.md, executed as written (its algorithm is unregistered after)."""
    doc = open(f"{REPO}/docs/ARCHITECTURE.md", encoding="utf-8").read()
    (code,) = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert len(code.strip().splitlines()) <= 20
    before = dict(REGISTRY)
    ns: dict = {}
    exec(compile(code, "docs/ARCHITECTURE.md", "exec"), ns)  # noqa: S102 - the documented example itself
    yield ns
    REGISTRY.clear()
    REGISTRY.update(before)


def _problem(n=29, d=16, v=211, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.3
    y = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g)
    mask = (torch.rand(n, generator=g) > 0.2).float()
    with torch.no_grad():
        old = linear_logprobs_ref(h.double(), w.double(), y, temperature=TEMP).float()
    old = old + 0.4 * torch.randn(n, generator=g)  # ratios on both sides of the clip
    return h, w, y, adv, mask, old


def _cispo_hand(h, w, y, adv, mask, old, eps):
    """float64: loss = sum_t m_t (-min(r_t, 1 + eps) A_t logp_t) / sum m, the weight held constant."""
    hh = h.double().requires_grad_()
    logp = linear_logprobs_ref(hh, w.double(), y, temperature=TEMP)
    r = torch.exp(logp.detach() - old.double()).clamp(max=1 + eps)
    m = mask.double()
    loss = (-(r * adv.double() * logp) * m).sum() / m.sum()
    return loss, torch.autograd.grad(loss, hh)[0]


@pytest.mark.parametrize("impl", (*cpu_head_impls(), "reference", "triton"))  # triton: interpreted on CPU
def test_documented_term_through_the_fused_head_matches_float64(example, impl):
    h, w, y, adv, mask, old = _problem()
    gt_loss, gt_dh = _cispo_hand(h, w, y, adv, mask, old, eps=0.28)
    hh = h.clone().requires_grad_()
    loss, stats = fused_policy_loss(hh, w, y, adv, mask, old, temperature=TEMP, terms=[example["CISPO"](0.28)],
                                    impl=impl)
    (dh,) = torch.autograd.grad(loss, hh)
    assert loss.item() == pytest.approx(gt_loss.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(dh.double(), gt_dh, atol=1e-5)
    assert torch.equal(dh[mask == 0], torch.zeros_like(dh[mask == 0]))
    assert "clip_ratio/low" in stats  # a term without stats still reports the standard keys (as 0)


def test_documented_algorithm_registers_and_trains_one_step(example):
    from fasthint.batch import Sample
    from fasthint.data import render_prompt
    from fasthint.toy.model import build_model, build_tokenizer
    from fasthint.update import train_step

    assert REGISTRY["cispo"] is example["CISPOAlgorithm"]
    cfg = TrainConfig(algo="cispo", micro_batch_size=4, learning_rate=1e-3).validate()  # --algo cispo is valid
    algo = make_algorithm(cfg)
    terms = algo.objective()
    assert isinstance(terms[0], example["CISPO"]) and terms[0].eps == cfg.eps_high
    tok = build_tokenizer()
    model = build_model(tok, seed=0).train()
    g = torch.Generator().manual_seed(1)
    samples = [Sample(render_prompt(tok, f"{i}+1=?"), torch.randint(3, len(tok), (5,), generator=g).tolist(),
                      (-3.0 * torch.rand(5, generator=g)).tolist(), advantage=(-1.0) ** i) for i in range(4)]
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stats = train_step(model, samples, cfg, opt, sched, terms=terms)
    assert torch.isfinite(torch.tensor(stats["loss"])) and stats["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_terms_equal_the_shorthand_settings_and_the_float64_oracle():
    h, w, y, adv, mask, old = _problem(seed=3)
    ref = old + 0.1
    gamma = torch.where(torch.arange(len(y)) % 3 == 0, 1.3, 0.0)
    kw = dict(temperature=TEMP, impl="torch", ref_logp=ref)
    a, sa = fused_policy_loss(h, w, y, adv, mask, old, beta=0.05, eps_low=0.1, eps_high=0.3, dual_clip=3.0,
                              shaped_gamma=gamma, **kw)
    terms = [ShapedRatio(ClippedSurrogate(0.1, 0.3, 3.0)), KLPenalty(0.05)]
    b, sb = fused_policy_loss(h, w, y, adv, mask, old, terms=terms, token_fields={"gamma": gamma}, **kw)
    assert torch.equal(a, b) and all(torch.equal(sa[k], sb[k]) for k in ("clip_ratio/low", "clip_ratio/high", "kl"))
    lp = linear_logprobs_ref(h.double(), w.double(), y, temperature=TEMP)
    oracle, ostats = policy_loss_ref(lp, old.double(), adv.double(), mask, ref_logp=ref.double(), beta=0.05,
                                     eps_low=0.1, eps_high=0.3, dual_clip=3.0, shaped_gamma=gamma.double())
    assert a.item() == pytest.approx(oracle.item(), rel=1e-5, abs=1e-6)
    assert sa["kl"].item() == pytest.approx(ostats["kl"].item(), rel=1e-5)


def test_clip_terms_and_misuse():
    assert [type(t) for t in clip_terms(beta=0.0)] == [ClippedSurrogate]
    assert [type(t) for t in clip_terms(beta=0.1, shaped=True)] == [ShapedRatio, KLPenalty]
    lp = torch.zeros(3)
    with pytest.raises(ValueError, match="either terms"):
        policy_loss(lp, lp, lp, torch.ones(3), terms=[ClippedSurrogate()], eps_low=0.1)
    with pytest.raises(ValueError, match="at least one term"):
        policy_loss(lp, lp, lp, torch.ones(3), terms=[])


def _entropy_hand(h, w, b, y, adv, mask, old, coef):
    """float64, materialised: token-mean of the clipped surrogate minus ``coef`` * entropy."""
    hh, ww, bb = (x.double().requires_grad_() for x in (h, w, b))
    logp, ent = linear_logprobs_ref(hh, ww, y, bias=bb, temperature=TEMP, return_entropy=True)
    r, a, m = torch.exp(logp - old.double()), adv.double(), mask.double()
    obj = torch.minimum(r * a, r.clamp(0.8, 1.28) * a)
    loss = ((-obj - coef * ent) * m).sum() / m.sum()
    return loss, torch.autograd.grad(loss, (hh, ww, bb))


_NATIVE = cpu_head_impls()[1]
ENTROPY_CASES = [("torch", None), pytest.param("native", None, marks=_NATIVE.marks), ("reference", None),
                 ("triton", None), ("torch", 211 * 4), pytest.param("native", 211 * 4, marks=_NATIVE.marks)]


@pytest.mark.parametrize("impl,chunk_elems", ENTROPY_CASES)  # 211 * 4: ragged 4-row chunks
def test_entropy_bonus_value_and_gradients_match_float64(impl, chunk_elems):
    from conftest import chunked_policy_loss

    from fasthint.loss import EntropyBonus

    h, w, y, adv, mask, old = _problem(seed=5)
    b = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(6))
    gt_loss, gt = _entropy_hand(h, w, b, y, adv, mask, old, coef=0.3)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    terms = [ClippedSurrogate(), EntropyBonus(0.3)]
    if chunk_elems is not None:  # the chunked kernel directly, with its chunk size
        loss, stats = chunked_policy_loss(*leaves[:2], y, adv, mask, old, bias=leaves[2], temperature=TEMP,
                                          return_entropy=True, chunk_elems=chunk_elems, native=impl == "native",
                                          terms=terms)
    else:
        loss, stats = fused_policy_loss(*leaves[:2], y, adv, mask, old, bias=leaves[2], temperature=TEMP,
                                        return_entropy=True, terms=terms, impl=impl)
    grads = torch.autograd.grad(loss * 1.7, leaves)  # a non-unit upstream gradient
    assert loss.item() == pytest.approx(gt_loss.item(), rel=1e-5, abs=1e-6)
    for name, fast, want in zip(("dhidden", "dweight", "dbias"), grads, gt):
        assert torch.allclose(fast.double(), 1.7 * want, atol=2e-5, rtol=1e-4), name
    _, gt_ent = linear_logprobs_ref(h.double(), w.double(), y, bias=b.double(), temperature=TEMP, return_entropy=True)
    assert torch.allclose(stats["entropy"].double(), gt_ent, atol=1e-5)


def test_entropy_bonus_is_configured_by_entropy_coef():
    from fasthint.loss import EntropyBonus

    cfg = TrainConfig(entropy_coef=0.01).validate()
    assert [type(t) for t in make_algorithm(cfg).objective()] == [ClippedSurrogate, EntropyBonus]
    assert [type(t) for t in make_algorithm(TrainConfig(algo="guide", entropy_coef=0.01).validate()).objective()] \
        == [ShapedRatio, EntropyBonus]
    with pytest.raises(ValueError, match="entropy"):
        lp = torch.zeros(3)
        policy_loss(lp, lp, lp, torch.ones(3), terms=[EntropyBonus(0.1)])  # no entropy given


def test_the_entropy_bonus_trains_on_zero_advantage_samples():
    """With ``--entropy_coef`` > 0 a sample whose advantage is 0 still has a loss (the bonus), so the
    update must not skip it (issue 30: it was skipped whenever there was no KL): a batch of all-zero
    advantages moves the parameters with the bonus and not without it."""
    from fasthint.batch import Sample
    from fasthint.data import render_prompt
    from fasthint.toy.model import build_model, build_tokenizer
    from fasthint.update import train_step

    tok = build_tokenizer()
    g = torch.Generator().manual_seed(2)
    samples = [Sample(render_prompt(tok, f"{i}+2=?"), torch.randint(3, len(tok), (6,), generator=g).tolist(),
                      (-3.0 * torch.rand(6, generator=g)).tolist(), advantage=0.0) for i in range(4)]
    moved = {}
    for coef in (0.0, 0.05):
        cfg = TrainConfig(entropy_coef=coef, micro_batch_size=4, learning_rate=1e-3).validate()
        model = build_model(tok, seed=0).train()
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        stats = train_step(model, samples, cfg, opt, sched, terms=make_algorithm(cfg).objective())
        moved[coef] = (stats["grad_norm"], any(not torch.equal(a, b) for a, b in zip(before, model.parameters())))
    assert moved[0.0] == (0.0, False)
    assert moved[0.05][0] > 0 and moved[0.05][1]


def test_every_built_in_term_lowers_itself_to_the_kernel_epilogue(caplog, monkeypatch):
    """Issue 31: each term says how it reaches the kernel (``Term.lower``). Every built-in term of
    ``fasthint.terms`` has a kernel form, alone and together, so on CUDA none falls back to the composed
    path; a term without one (the documented CISPO example) makes the objective say so, once."""
    import logging

    import fasthint.terms as terms_module
    from fasthint.loss import EntropyBonus, Term, make_objective
    from fasthint_kernels.spec import PGSpec

    built_in = {c for c in vars(terms_module).values() if isinstance(c, type) and issubclass(c, Term) and c is not Term}
    assert built_in == {ClippedSurrogate, ShapedRatio, KLPenalty, EntropyBonus}
    n = 7
    g = torch.Generator().manual_seed(0)
    old, adv, ref, gam = (torch.randn(n, generator=g) for _ in range(4))
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.float32)
    iw = torch.rand(n, generator=g)
    every = [ShapedRatio(ClippedSurrogate(0.1, 0.3, 3.0)), KLPenalty(0.05), EntropyBonus(0.01)]
    with caplog.at_level(logging.INFO, logger="fasthint"):
        for chosen in ([every[0].base], [every[0]], every, [every[0].base, every[1]], [every[0].base, every[2]]):
            obj = make_objective(old, adv, mask, ref_logp=ref, terms=chosen,
                                 token_fields={"gamma": gam, "is_weight": iw})
            spec = obj.lower()
            assert isinstance(spec, PGSpec), chosen
            assert (spec.eps_low, spec.eps_high, spec.dual_clip) == (0.1, 0.3, 3.0)
            assert torch.equal(spec.is_weights, obj.tokens.fields["is_weight"])
            assert (spec.gamma is not None) == isinstance(chosen[0], ShapedRatio)
            assert spec.beta == (0.05 if every[1] in chosen else 0.0) and (spec.ref_logp is not None) == (spec.beta > 0)
            assert spec.entropy_coef == (0.01 if every[2] in chosen else 0.0)
            assert torch.equal(spec.weights, obj.weights * mask)
    assert "no kernel form" not in caplog.text

    class Custom(Term):
        def loss(self, logp, t):
            return -t.advantages * logp

    import fasthint.loss as loss_module

    monkeypatch.setattr(loss_module, "_COMPOSED", set())  # said once per process: earlier tests may have said it
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fasthint"):
        for _ in range(2):
            assert make_objective(old, adv, mask, terms=[Custom()]).lower() is None
            assert make_objective(old, adv, mask, terms=[every[0].base, every[0].base]).lower() is None  # two clips
    assert caplog.text.count("objective term Custom has no kernel form") == 1
