"""The algorithms' decisions (which prompts get hints, which contexts and old log-probs train) with a
scripted engine, and their losses against float64 computations written from the formulas."""
import math
from types import SimpleNamespace

import pytest
import torch

from fasthint.algorithms import REGISTRY, affinity, make_algorithm
from fasthint.algorithms.base import Group, RolloutContext, SolveTracker, group_metrics, sample_groups
from fasthint.config import TrainConfig
from fasthint.engines.base import Completion, SamplingConfig
from fasthint.loss import fused_policy_loss, policy_loss

G = 4


class ScriptedEngine:
    """Completion token = the prompt's first id; records every generate call."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling):
        self.calls.append([list(p) for p in prompts])
        return [Completion(i, [p[0], 7 + j], [-0.5 - 0.1 * j, -0.25], truncated=(j == G - 1 and p[0] % 7 == 0))
                for i, p in enumerate(prompts) for j in range(sampling.n)]

    def update_weights(self, model):
        pass


class Tok:
    def batch_decode(self, seqs, skip_special_tokens=True):
        return [str(s[0]) for s in seqs]


class Hints:
    """Level texts 'L1'..'L3' for every row except those marked no_hint; counts calls."""

    def __init__(self):
        self.calls, self.stats = [], {}

    def hints(self, rows):
        self.calls.append([r["uid"] for r in rows])
        self.stats = {"requested": len(rows), "parse_fail": sum(bool(r.get("no_hint")) for r in rows)}
        return [None if r.get("no_hint") else {lv: f"L{lv}" for lv in range(1, r.get("levels", 3) + 1)}
                for r in rows]  # "levels": how many survived the provider's leak check


def _ctx(rows, engine=None, hints=None, next_rows=None):
    """prompt ids = [100*row + level]; a row is solved when sampled with level >= row['needs']
    (needs 0: solved without hint; 9: never; 'all': every completion correct at level 0)."""
    index = {r["uid"]: k for k, r in enumerate(rows)}

    def render(row, hint):
        return [100 * index[row["uid"]] + (int(hint[1]) if hint else 0)]

    def score(texts, rs, prompt_ids=None, completion_ids=None):
        out = []
        for j, (t, r) in enumerate(zip(texts, rs)):
            lvl = int(t) % 100
            out.append(float(lvl >= r["needs"] and (j % 2 == 0 or bool(r.get("all")))))
        return out

    return RolloutContext(engine=engine or ScriptedEngine(), tokenizer=Tok(), sampling=SamplingConfig(n=G),
                          score=score, render=render, hints=hints, next_rows=next_rows)


def _rows(needs, extra=None):
    extra = extra or {}
    return [dict(uid=str(10 + k), question=f"q{k}", answer="1", needs=n, **extra.get(k, {}))
            for k, n in enumerate(needs)]


def _pure(g: Group) -> bool:
    return all(c.token_ids[0] == g.prompt_ids[0] for c in g.completions) and len(g.completions) == G


def test_sample_groups_are_pure_and_keyed_by_uid():
    rows = _rows([0, 9, 0])
    groups = sample_groups(_ctx(rows), rows, [None, "L2", None], [0, 2, 0])
    assert [g.uid for g in groups] == ["10", "11", "12"]
    assert all(_pure(g) for g in groups) and [g.level for g in groups] == [0, 2, 0]


@pytest.mark.parametrize("escalation", ["sequential", "parallel"])
def test_sage_escalates_only_unresolved_prompts(escalation):
    # row 0 solved unhinted, 1 needs level 1, 2 needs level 3, 3 never solved, 4 has no hint, 5 all correct
    rows = _rows([0, 1, 3, 9, 9, 0], {4: {"no_hint": True}, 5: {"all": True}})
    eng, hints = ScriptedEngine(), Hints()
    algo = make_algorithm(TrainConfig(algo="sage", sage_escalation=escalation).validate())
    groups, info = algo.rollout(rows, _ctx(rows, eng, hints))
    if escalation == "sequential":  # one no-hint pass, level 1 for the 3 hintable failures, 2 and 3 for the rest
        assert [len(c) for c in eng.calls] == [6, 3, 2, 2]
    else:  # one no-hint pass, then the 3 hintable failures at levels 1, 2, 3 in one call
        assert eng.calls[1] == [[100 * k + lv] for k in (1, 2, 3) for lv in (1, 2, 3)]
    assert hints.calls == [["11", "12", "13", "14"]]  # only all-zero groups ask for hints
    assert [g.uid for g in groups] == [r["uid"] for r in rows]
    assert [g.level for g in groups] == [0, 1, 3, 3, 0, 0]
    assert all(_pure(g) for g in groups)
    assert groups[1].solved and groups[2].solved and not groups[3].solved
    assert groups[3].pre_hint_rewards == [0.0] * G and groups[0].pre_hint_rewards is None
    assert info["hint/parse_fail"] == pytest.approx(1 / 4)
    m = group_metrics(groups)
    assert m["hint/rate"] == pytest.approx(3 / 6) and m["hint/rate_level_3"] == pytest.approx(2 / 6)
    assert m["frac_reward_zero_std/pre_hint"] == pytest.approx(5 / 6)  # all-zero x4 and all-correct
    assert m["frac_reward_zero_std"] == pytest.approx(3 / 6)


@pytest.mark.parametrize("escalation", ["sequential", "parallel"])
def test_sage_stops_at_the_strongest_level_a_prompt_has(escalation):
    # rows 0 and 1 need level 3 but kept only levels 1-2 (level 3 stated the answer); row 2 has all three
    rows = _rows([3, 2, 3], {0: {"levels": 2}, 1: {"levels": 2}})
    eng = ScriptedEngine()
    algo = make_algorithm(TrainConfig(algo="sage", sage_escalation=escalation).validate())
    groups, _ = algo.rollout(rows, _ctx(rows, eng, Hints()))
    if escalation == "sequential":
        assert [len(c) for c in eng.calls] == [3, 3, 3, 1]  # level 3 only for the row that has it
    else:
        assert eng.calls[1] == [[1], [2], [101], [102], [201], [202], [203]]
    assert [g.level for g in groups] == [2, 2, 3] and not groups[0].solved and groups[1].solved


def test_guide_falls_back_to_the_strongest_kept_level():
    rows = _rows([1, 1], {0: {"levels": 1}})
    eng = ScriptedEngine()
    algo = make_algorithm(TrainConfig(algo="guide", hint_level=2).validate())
    groups, _ = algo.rollout(rows, _ctx(rows, eng, Hints()))
    assert eng.calls[1] == [[1], [102]] and [g.level for g in groups] == [1, 2]


def test_sage_trains_on_the_hinted_context():
    rows = _rows([2])
    algo = make_algorithm(TrainConfig(algo="sage").validate())
    ctx = _ctx(rows, hints=Hints())
    groups, _ = algo.rollout(rows, ctx)
    samples, _ = algo.samples(groups, ctx)
    assert all(s.prompt_ids == [2] for s in samples)  # level-2 hint in the prompt (never scored)
    assert [s.old_logprobs for s in samples] == [c.logprobs for c in groups[0].completions]
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float64)
    r = torch.tensor(groups[0].rewards, dtype=torch.float64)
    assert torch.allclose(adv, (r - r.mean()) / (r.std() + 1e-6), atol=1e-6)


def test_sage_light_state_machine():
    cfg = TrainConfig(algo="sage_light").validate()
    algo = make_algorithm(cfg)
    assert algo.next_level("a") == 0  # first visit: no hint
    for prev_acc, prev_lvl, want in [(0.0, 0, 1), (0.1, 1, 2), (0.0, 3, 3), (0.2, 2, 2), (0.35, 1, 1),
                                     (0.36, 2, 1), (1.0, 0, 0)]:
        algo.levels["a"], algo.last_acc["a"] = prev_lvl, prev_acc
        assert algo.next_level("a") == want, (prev_acc, prev_lvl)
    restored = make_algorithm(cfg)
    restored.load_state_dict(algo.state_dict())
    assert restored.levels == algo.levels and restored.last_acc == algo.last_acc


def test_sage_light_one_pass_per_step_and_levels_persist():
    rows = _rows([1, 9, 0])
    eng, hints = ScriptedEngine(), Hints()
    algo = make_algorithm(TrainConfig(algo="sage_light").validate())
    ctx = _ctx(rows, eng, hints)
    g1, _ = algo.rollout(rows, ctx)  # visit 1: no hints; accuracies 0, 0, 0.5
    assert [g.level for g in g1] == [0, 0, 0] and hints.calls == []
    g2, _ = algo.rollout(rows, ctx)  # visit 2: rows 0 and 1 at level 1, row 2 stays at 0
    assert [g.level for g in g2] == [1, 1, 0] and hints.calls == [["10", "11"]]
    g3, _ = algo.rollout(rows, ctx)  # row 0 solved at level 1 (acc 0.5 > 0.35) -> back to 0; row 1 -> 2
    assert [g.level for g in g3] == [0, 2, 0]
    assert [len(c) for c in eng.calls] == [3, 3, 3]  # exactly one engine call per step
    assert all(_pure(g) for g in g1 + g2 + g3)


@pytest.mark.parametrize("max_rounds,kept,calls", [(3, 4, [4, 2, 1]), (2, 3, [4, 2]), (1, 2, [4])])
def test_dapo_keeps_only_informative_groups_and_oversamples(max_rounds, kept, calls):
    rows = _rows([0, 9, 9, 0])
    extra = iter([_rows([0, 9]), _rows([0])])
    eng = ScriptedEngine()
    algo = make_algorithm(TrainConfig(algo="dapo", dapo_max_rounds=max_rounds).validate())
    groups, info = algo.rollout(rows, _ctx(rows, eng, next_rows=lambda: next(extra)))
    assert all(max(g.rewards) > min(g.rewards) for g in groups)
    assert len(groups) == kept and info["dapo/rounds"] == len(calls)
    assert info["dapo/prompts_sampled"] == sum(calls)
    assert [len(c) for c in eng.calls] == calls  # later rounds ask only for the missing prompts


def test_solve_tracker_counts_hinted_and_unhinted_visits():
    t = SolveTracker()
    g = lambda uid, r, pre=None: Group(uid, {}, [0], [], r, pre_hint_rewards=pre)  # noqa: E731
    assert t.update([g("a", [0, 0]), g("b", [0, 1])]) == pytest.approx(0.5)
    assert t.update([g("a", [1, 0], pre=[0, 0]), g("c", [0, 0])]) == pytest.approx(1 / 3)
    t2 = SolveTracker()
    t2.load_state_dict(t.state_dict())
    assert t2.update([]) == pytest.approx(1 / 3)


# ---- losses: Guide's shaped objective, HINT's AAPO weights -------------------------------------------


def test_guide_shaped_loss_value_and_gradient_float64():
    logp = torch.tensor([-1.0, -0.5, -2.0, -0.1, -3.0], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-1.2, -0.4, -1.0, -0.1, -0.2], dtype=torch.float64)
    adv = torch.tensor([1.5, 1.5, -0.7, -0.7, 2.0], dtype=torch.float64)
    gamma = torch.tensor([0.8, 0.8, 0.0, 0.0, 1.3], dtype=torch.float64)  # tokens 2,3 unhinted: clipped
    mask = torch.tensor([1, 1, 1, 1, 0], dtype=torch.float64)
    loss, _ = policy_loss(logp, old, adv, mask, shaped_gamma=gamma, eps_low=0.2, eps_high=0.28)
    (grad,) = torch.autograd.grad(loss, logp)
    exp_loss, exp_grad = 0.0, []
    for lp, o, a, gm, m in zip(logp.tolist(), old.tolist(), adv.tolist(), gamma.tolist(), mask.tolist()):
        r = math.exp(lp - o)
        if not m:
            exp_grad.append(0.0)
            continue
        if gm > 0:  # -A r / (r + gamma); d/dlogp = -A gamma r / (r + gamma)^2
            exp_loss += -a * r / (r + gm)
            exp_grad.append(-a * gm * r / (r + gm) ** 2)
        else:
            rc = min(max(r, 0.8), 1.28)
            unclipped = r * a <= rc * a
            exp_loss += -min(r * a, rc * a)
            exp_grad.append(-a * r if unclipped else 0.0)
    assert loss.item() == pytest.approx(exp_loss / 4, abs=1e-12)
    assert torch.allclose(grad, torch.tensor(exp_grad, dtype=torch.float64) / 4, atol=1e-12)


def test_guide_shaped_loss_fused_path_matches_reference():
    g = torch.Generator().manual_seed(3)
    n, d, v = 19, 16, 211
    h, w = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(v, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    old = torch.randn(n, generator=g, dtype=torch.float64) - 5
    adv, mask = torch.randn(n, generator=g, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    gamma = torch.where(torch.arange(n) % 2 == 0, torch.rand(n, generator=g, dtype=torch.float64) + 0.5,
                        torch.zeros(n, dtype=torch.float64))
    out = {}
    for impl in ("reference", "torch"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, _ = fused_policy_loss(hh, ww, y, adv, mask, old, shaped_gamma=gamma, temperature=0.7, impl=impl)
        out[impl] = [loss.detach()] + list(torch.autograd.grad(loss, (hh, ww)))
    for a, b in zip(out["reference"], out["torch"]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def tiny_model():
    from fasthint.toy.model import build_model, build_tokenizer

    tok = build_tokenizer()
    return build_model(tok, seed=0).eval(), tok


def _hinted_groups(tok):
    """Two groups: one unhinted with mixed rewards, one hinted (level 2) with mixed rewards."""
    from fasthint.data import render_prompt
    from fasthint.hints import hinted_question

    rows = [dict(uid="0", question="2+3=?", answer="5"), dict(uid="1", question="7-4=?", answer="3")]

    def render(row, hint):
        return render_prompt(tok, hinted_question(row["question"], hint) if hint else row["question"])

    comps = lambda: [Completion(0, tok.encode(t), [-1.0 - 0.2 * k] * len(tok.encode(t)))  # noqa: E731
                     for k, t in enumerate(["5}", "6}", "5 ok", "x"])]
    groups = [Group("0", rows[0], render(rows[0], None), comps(), [1.0, 0.0, 1.0, 0.0]),
              Group("1", rows[1], render(rows[1], "take 4"), comps(), [0.0, 1.0, 1.0, 1.0], level=2,
                    hint="take 4", pre_hint_rewards=[0.0] * 4)]
    ctx = SimpleNamespace(render=render)
    return groups, ctx, render


def _current_logp(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_guide_samples_no_hint_numerator_hinted_denominator_gamma(tiny_model):
    model, tok = tiny_model
    groups, ctx, render = _hinted_groups(tok)
    cfg = TrainConfig(algo="guide", bf16=False).validate()
    samples, info = make_algorithm(cfg).samples(groups, ctx, model)
    plain = render(groups[1].row, None)
    ratios = []
    for s, c in zip(samples[4:], groups[1].completions):
        assert s.prompt_ids == plain and s.old_logprobs == c.logprobs  # hinted: trained without the hint
        r = torch.exp(_current_logp(model, plain, c.token_ids) - torch.tensor(c.logprobs, dtype=torch.float64))
        assert s.gamma == pytest.approx(max(float(torch.quantile(r, 0.9)), 1e-4), rel=1e-5)
        ratios.append(r)
    assert all(s.gamma == 0.0 and s.prompt_ids == groups[0].prompt_ids for s in samples[:4])
    assert info["guide/ratio_max"] == pytest.approx(torch.cat(ratios).max().item(), rel=1e-5)


def test_guide_gamma_is_recomputed_for_each_mini_batch(tiny_model):
    """Issue 30: gamma (the 90th percentile of a hinted sequence's ratios) was computed once, before the
    update, and stale on the second mini-batch; it is recomputed from the policy about to step."""
    import copy

    model, tok = copy.deepcopy(tiny_model[0]), tiny_model[1]  # moved below: the fixture is shared
    groups, ctx, render = _hinted_groups(tok)
    algo = make_algorithm(TrainConfig(algo="guide", bf16=False, steps_per_generation=2).validate())
    samples, _ = algo.samples(groups, ctx, model)
    before = [s.gamma for s in samples[4:]]
    assert algo.before_update(samples[4:], model, True) == {} and [s.gamma for s in samples[4:]] == before
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    algo.before_update(samples, model, False)
    plain = render(groups[1].row, None)
    for s, c in zip(samples[4:], groups[1].completions):
        r = torch.exp(_current_logp(model, plain, c.token_ids) - torch.tensor(c.logprobs, dtype=torch.float64))
        assert s.gamma == pytest.approx(max(float(torch.quantile(r, 0.9)), 1e-4), rel=1e-5)
    assert [s.gamma for s in samples[4:]] != pytest.approx(before, rel=1e-3)
    assert all(s.gamma == 0.0 for s in samples[:4])


def test_hint_recomputes_old_logp_and_weights_by_affinity(tiny_model):
    """HINT's ratio is no-hint over no-hint: right before the one update it is 1, so Affinity = 1 and the
    AAPO weight stays 1; the hinted-context shift is only the affinity/sampling diagnostic."""
    model, tok = tiny_model
    groups, ctx, render = _hinted_groups(tok)
    cfg = TrainConfig(algo="hint", aapo_lambda=2.0, bf16=False).validate()
    algo = make_algorithm(cfg)
    samples, info = algo.samples(groups, ctx, model)
    plain = render(groups[1].row, None)
    lr, advs, masks = [], [], []
    T = max(len(c.token_ids) for c in groups[1].completions)
    for s, c in zip(samples[4:], groups[1].completions):
        now = _current_logp(model, plain, c.token_ids)
        assert s.prompt_ids == plain
        assert torch.allclose(torch.tensor(s.old_logprobs, dtype=torch.float64), now, atol=1e-5)
        pad = T - len(now)
        lr.append(torch.cat([now - torch.tensor(c.logprobs, dtype=torch.float64),
                             torch.zeros(pad, dtype=torch.float64)]))
        masks.append(torch.cat([torch.ones(len(now)), torch.zeros(pad)]).double())
        advs.append(s.advantage)
    aff, eur, uc = affinity(torch.stack(lr), torch.tensor(advs, dtype=torch.float64), torch.stack(masks), eps=0.2)
    assert aff.item() < 0.9  # the hint shifted the distribution: the diagnostic sees it
    assert info["affinity/sampling"] == pytest.approx(aff.item(), rel=1e-4, abs=1e-6)
    assert info["affinity/sampling/eur"] == pytest.approx(eur.item(), rel=1e-4, abs=1e-6)
    assert info["affinity/sampling/uc"] == pytest.approx(uc.item(), rel=1e-4, abs=1e-6)
    first = algo.before_update(samples, model, True)  # the batch's first optimiser step: log r = 0
    assert first == {}  # Affinity would be the constant 1: not logged (issue 30)
    assert all(s.weight == 1.0 for s in samples)  # AAPO: 1 ** lambda


def test_hint_affinity_on_a_later_step_uses_the_moved_policy(tiny_model):
    """With several optimiser steps per batch, a later step's Affinity is HINT's no-hint ratio
    pi_theta(y|x) / pi_old(y|x) under the moved policy, and the AAPO weight is Affinity ** lambda."""
    import copy

    model, tok = tiny_model
    groups, ctx, render = _hinted_groups(tok)
    cfg = TrainConfig(algo="hint", aapo_lambda=2.0, bf16=False).validate()
    algo = make_algorithm(cfg)
    samples, _ = algo.samples(groups, ctx, model)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.02 * torch.randn_like(p))
    info = algo.before_update(samples, moved, False)
    plain = render(groups[1].row, None)
    lr, advs, masks = [], [], []
    T = max(len(c.token_ids) for c in groups[1].completions)
    for s, c in zip(samples[4:], groups[1].completions):
        now = _current_logp(moved, plain, c.token_ids)
        pad = T - len(now)
        lr.append(torch.cat([now - torch.tensor(s.old_logprobs, dtype=torch.float64), torch.zeros(pad).double()]))
        masks.append(torch.cat([torch.ones(len(now)), torch.zeros(pad)]).double())
        advs.append(s.advantage)
    aff, eur, uc = affinity(torch.stack(lr), torch.tensor(advs, dtype=torch.float64), torch.stack(masks), eps=0.2)
    assert 0.0 < aff.item() < 0.99  # the policy moved: the ratio left 1
    assert info["affinity"] == pytest.approx(aff.item(), rel=1e-4, abs=1e-6)
    assert info["affinity/uc"] == pytest.approx(uc.item(), rel=1e-4, abs=1e-6)
    assert "affinity/unhinted" in info and info["affinity/unhinted"] < 1.0
    assert all(s.weight == pytest.approx(aff.item() ** 2, rel=1e-4) for s in samples[4:])
    assert all(s.weight == 1.0 for s in samples[:4])  # unhinted groups are never reweighted


def test_hint_affinity_leaves_zero_advantage_groups_out_of_the_means(tiny_model):
    model, tok = tiny_model
    groups, ctx, _ = _hinted_groups(tok)
    groups[0].rewards = [1.0] * 4  # the unhinted group now has zero advantages
    algo = make_algorithm(TrainConfig(algo="hint", bf16=False).validate())
    samples, _ = algo.samples(groups, ctx, model)
    info = algo.before_update(samples, model, False)  # a later step of an unmoved policy: log r ~ 0
    assert "affinity/unhinted" not in info and info["affinity"] == pytest.approx(1.0, abs=1e-5)


def test_every_algorithm_is_registered_and_in_the_config():
    from fasthint.config import ALGOS

    assert set(REGISTRY) == set(ALGOS)


def test_hinted_prompt_longer_than_max_prompt_length_gets_its_hint_cut():
    from fasthint.data import render_prompt
    from fasthint.hints import hinted_question
    from fasthint.toy.model import build_tokenizer
    from fasthint.build import renderer as _renderer

    tok = build_tokenizer()
    row = {"uid": "0", "question": "What is 12 + 30?"}
    plain = render_prompt(tok, row["question"])
    cfg = TrainConfig(max_prompt_length=len(plain) + 40).validate()
    timings: dict = {}
    render = _renderer({"0": plain}, tok, cfg, timings)
    assert render(row, None) == plain
    short = render(row, "add")
    assert short == render_prompt(tok, hinted_question(row["question"], "add")) and not timings
    long_hint = "first add the tens, then add the ones, and check the sum twice " * 4
    full = render_prompt(tok, hinted_question(row["question"], long_hint))
    cut = render(row, long_hint)
    assert len(full) > cfg.max_prompt_length >= len(cut) >= len(plain)
    assert timings["hint_truncated"] == 1
    kept = tok.decode(cut, skip_special_tokens=True).split("Hint: ", 1)[1].split("\n")[0]
    assert len(kept) > 10 and long_hint.startswith(kept) and len(kept) < len(long_hint)  # a prefix of the hint


def test_sage_light_stores_the_level_it_showed_and_falls_back_to_the_last_hints():
    """Issue 30, fix 6: when the provider gives no hint, SAGE-light shows the last good hint set of that
    prompt (SAGE's code does), and with none it records level 0, the level shown; it recorded the
    planned level, so levels climbed with no hint ever shown."""
    class Flaky:
        """Hints at the first request for a row, none after; rows marked no_hint never get any."""

        def __init__(self):
            self.seen, self.stats = set(), {}

        def hints(self, rows):
            out = [None if r.get("no_hint") or r["uid"] in self.seen else {1: "L1", 2: "L2", 3: "L3"} for r in rows]
            self.seen.update(r["uid"] for r in rows)
            self.stats = {"requested": len(rows), "parse_fail": sum(h is None for h in out)}
            return out

    rows = _rows([9, 9], {1: {"no_hint": True}})
    algo = make_algorithm(TrainConfig(algo="sage_light").validate())
    ctx = _ctx(rows, ScriptedEngine(), Flaky())
    levels, shown = [], []
    for _ in range(4):
        groups, _ = algo.rollout(rows, ctx)
        levels.append([g.level for g in groups])
        shown.append([g.prompt_ids[0] % 100 for g in groups])  # the hint level in the prompt
    # row 0: hints once, then the same set again as its level climbs; row 1: never a hint, level 0
    assert shown == levels == [[0, 0], [1, 0], [2, 0], [3, 0]]
    restored = make_algorithm(TrainConfig(algo="sage_light").validate())
    restored.load_state_dict(algo.state_dict())
    assert restored.last_hints == algo.last_hints == {"10": {1: "L1", 2: "L2", 3: "L3"}}
