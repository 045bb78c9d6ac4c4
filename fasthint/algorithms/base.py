"""What every algorithm shares: groups keyed by prompt uid, one rollout context, GRPO's advantages.

An algorithm decides which prompts get hints, builds the hinted contexts, and says which context
and which old log-probs each completion trains with; the trainer loop stays one loop:

    groups, info = algo.rollout(rows, ctx)              # sample (and maybe hint and re-sample)
    samples, info2 = algo.samples(groups, ctx, model)   # advantages, training contexts, weights
    train_step(samples)

A :class:`Group` is always pure: all of its completions come from one context (no hint, or one hint
text at one level). Groups are keyed by the prompt's uid, never by row order.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Union

import torch

from fasthint import dist, ops
from fasthint.batch import Sample
from fasthint.engines.base import Completion, SamplingConfig
from fasthint.loss import Term, clip_terms
from fasthint.options import Options, at_least, option

# (texts, rows, prompt_ids, completion_ids) -> rewards (fasthint.reward_funcs.Rewards: a Scores list that
# also carries each completion's correctness)
ScoreFn = Callable[[list[str], list[dict], list[list[int]], list[list[int]]], list[float]]


@dataclass
class Group:
    """One prompt's ``G`` completions, all sampled from ``prompt_ids`` (hinted when ``level > 0``)."""

    uid: str
    row: dict
    prompt_ids: list[int]
    completions: list[Completion]
    rewards: list[float]
    level: int = 0
    hint: Optional[str] = None
    pre_hint_rewards: Optional[list[float]] = None  # rewards of the no-hint group this one replaced
    correct: Optional[list[float]] = None  # the correct-reward's values (--correct_reward); None: the rewards
    pre_hint_correct: Optional[list[float]] = None  # the same for the replaced no-hint group
    reward_parts: Optional[dict] = None  # each reward function's values (None: not applicable), for the logs
    pre_hint_parts: Optional[dict] = None  # the same for the replaced no-hint group

    def replacing(self, old: "Group") -> "Group":
        """This hinted group, recording the no-hint group ``old`` it replaces (its rewards, correctness
        and reward parts: the no-hint figures the metrics report)."""
        self.pre_hint_rewards, self.pre_hint_correct, self.pre_hint_parts = old.rewards, old.hits, old.reward_parts
        return self

    @property
    def hits(self) -> list[float]:
        """What decides correctness: >= 1 is correct (the ``math`` reward by default)."""
        return self.correct if self.correct is not None else self.rewards

    @property
    def all_zero(self) -> bool:
        return max(self.hits) <= 0.0

    @property
    def solved(self) -> bool:
        return max(self.hits) >= 1.0

    @property
    def accuracy(self) -> float:
        return sum(r >= 1.0 for r in self.hits) / len(self.hits)


@dataclass
class RolloutContext:
    """What an algorithm may use to sample: the engine, the reward, prompt rendering, hints."""

    engine: object
    tokenizer: object
    sampling: SamplingConfig
    score: ScoreFn
    render: Callable[[dict, Optional[str]], list[int]]  # (row, hint or None) -> prompt token ids
    hints: Optional[object] = None                      # a HintProvider (algorithms.hint_providers)
    next_rows: Optional[Callable[[], list[dict]]] = None  # the next GLOBAL batch of rows (DAPO's oversampling)
    timings: dict = field(default_factory=dict)


def sample_groups(ctx: RolloutContext, rows: list[dict], hints: Optional[list[Optional[str]]] = None,
                  level: Union[int, list[int]] = 0) -> list[Group]:
    """Samples ``G`` completions for each row (with its hint, if any; ``level`` per row or for all)
    in ONE engine call, and scores them."""
    if not rows:
        return []
    hints = hints or [None] * len(rows)
    levels = level if isinstance(level, list) else [level] * len(rows)
    prompts = [ctx.render(r, h) for r, h in zip(rows, hints)]
    comps = ctx.engine.generate(prompts, ctx.sampling)
    texts = ctx.tokenizer.batch_decode([c.token_ids for c in comps], skip_special_tokens=True)
    rewards = ctx.score(texts, [rows[c.prompt_index] for c in comps], [prompts[c.prompt_index] for c in comps],
                        [c.token_ids for c in comps])
    correct = getattr(rewards, "correct", None)  # fasthint.reward_funcs.Scores; a plain list: rewards decide
    parts = getattr(rewards, "parts", None)
    by_prompt: list[list[int]] = [[] for _ in rows]
    for i, c in enumerate(comps):
        by_prompt[c.prompt_index].append(i)
    return [Group(uid=rows[p]["uid"], row=rows[p], prompt_ids=prompts[p], completions=[comps[i] for i in idx],
                  rewards=[float(rewards[i]) for i in idx], level=levels[p] if hints[p] is not None else 0,
                  hint=hints[p], correct=None if correct is None else [float(correct[i]) for i in idx],
                  reward_parts=None if parts is None else {k: [v[i] for i in idx] for k, v in parts.items()})
            for p, idx in enumerate(by_prompt)]


def group_advantages(groups: list[Group], cfg) -> list[list[float]]:
    """GRPO advantages within each group (``ops.group_advantages``, keyed by group index). With
    ``adv_scale=batch`` on several processes the std is that of every process's rewards (a collective:
    every process calls this once per step)."""
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)
    ids = torch.tensor([k for k, g in enumerate(groups) for _ in g.rewards], dtype=torch.long)
    if cfg.adv_scale == "batch" and dist.world_size() > 1:
        every = torch.tensor([r for part in dist.all_gather(rewards.tolist()) for r in part], dtype=torch.float64)
        std = every.std().item() if every.numel() > 1 else 0.0
        centred = ops.group_advantages(rewards.double(), ids, scale="none", eps=cfg.adv_eps, impl="torch")
        adv = (centred / (std + cfg.adv_eps)).float().tolist()
    else:
        adv = ops.group_advantages(rewards, ids, scale=cfg.adv_scale, eps=cfg.adv_eps).tolist()
    out, i = [], 0
    for g in groups:
        out.append(adv[i:i + len(g.rewards)])
        i += len(g.rewards)
    return out


@dataclass
class DAPOConfig(Options):
    GROUP = "dapo"
    dapo_max_rounds: int = option(3, "dapo, guide (with --guide_filter): sampling rounds per step to fill the "
                                     "batch with groups whose rewards differ.")

    def check(self) -> None:
        at_least(self, ("dapo_max_rounds",), 1)


def fill_batch(ctx: RolloutContext, rows: list[dict], sample_round: Callable[[list[dict]], tuple[list[Group], dict]],
               max_rounds: int) -> tuple[list[Group], dict]:
    """DAPO's dynamic sampling: ``sample_round(rows)`` (groups and an info dict) is called on this step's
    rows, then on fresh global batches from ``ctx.next_rows`` cut to what is missing, until
    ``len(rows)`` (over all processes) groups whose rewards differ are collected or ``max_rounds``
    rounds ran; exactly that many train (fewer when the rounds run out). The stopping rule and the cut
    use global counts (one all-reduce per round), so every process runs the same rounds.

    Info: ``dapo/rounds``, ``dapo/prompts_sampled``, ``dapo/kept_ratio``; ``_sampled_groups`` (every
    sampled group without its completions: the group and reward metrics' population); the rounds'
    own infos merged (``hint/requested`` summed, the other ``hint/*`` shares weighted by it)."""
    rank, world = dist.rank(), dist.world_size()
    want = int(dist.all_sum([len(rows)])[0])  # this step's prompts over all processes
    kept: list[Group] = []
    every: list[Group] = []
    infos: list[dict] = []
    sampled = rounds = 0
    while True:
        groups, info = sample_round(rows)
        infos.append(info)
        sampled += len(groups)
        every += [replace(g, row={}, prompt_ids=[], completions=[]) for g in groups]
        rounds += 1
        kept += [g for g in groups if max(g.rewards) > min(g.rewards)]
        n_kept = int(dist.all_sum([len(kept)])[0])
        if n_kept >= want or rounds >= max_rounds or ctx.next_rows is None:
            break
        rows = ctx.next_rows()[:max(1, want - n_kept)][rank::world]  # a global batch, cut, then split
    before = sum(dist.all_gather(len(kept))[:rank])  # the first `want` kept groups in rank order train
    total = int(dist.all_sum([sampled])[0])
    info = {**_merge_round_infos(infos), "dapo/rounds": rounds, "dapo/prompts_sampled": total,
            "dapo/kept_ratio": n_kept / max(1, total), "_sampled_groups": every}
    return kept[:max(0, want - before)], info


def _merge_round_infos(infos: list[dict]) -> dict:
    """One info for several sampling rounds: ``hint/requested`` summed, the other ``hint/*`` (shares of
    the requests) weighted by it, anything else from the last round that has it."""
    out: dict = {}
    req = [i.get("hint/requested", 0) for i in infos]
    for k in dict.fromkeys(k for i in infos for k in i):
        vals = [(i[k], r) for i, r in zip(infos, req) if k in i]
        if k == "hint/requested":
            out[k] = sum(v for v, _ in vals)
        elif k.startswith("hint/") and sum(r for _, r in vals):
            out[k] = sum(v * r for v, r in vals) / sum(r for _, r in vals)
        else:
            out[k] = vals[-1][0]
    return out


REGISTRY: dict[str, type] = {}  # --algo name -> class; a subclass that sets ``name`` registers itself


class Algorithm:
    """GRPO: no hints; every completion trains in the context it was sampled from.

    An algorithm is a subclass in one module of ``fasthint/algorithms/`` (found and imported by the
    package): ``name`` registers it for ``--algo``; ``options`` are its config components (their flags
    join ``TrainConfig`` and ``--help``); ``defaults`` resolve ``auto`` settings; ``objective()`` picks
    its loss terms; ``rollout``/``samples`` shape groups and training samples.
    """

    name = "grpo"
    options: tuple = ()  # the Options dataclasses this algorithm reads (composed into TrainConfig)
    hint_provider_default: Optional[str] = None  # algorithms that hint name their default provider
    # samples() runs the policy (a no-grad forward per rank, independently of the others): only then does
    # the trainer gather the sharded policy whole for it when the engine keeps its own weights (vLLM); a
    # 7B policy gathered for nothing is ~15 GB more while vLLM is awake
    samples_run_policy: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in REGISTRY and REGISTRY[cls.name].__qualname__ != cls.__qualname__:
                raise ValueError(f"algorithm name {cls.name!r} is taken by {REGISTRY[cls.name].__qualname__}")
            REGISTRY[cls.name] = cls

    def __init__(self, cfg):
        self.cfg = cfg

    def rollout(self, rows: list[dict], ctx: RolloutContext) -> tuple[list[Group], dict]:
        return sample_groups(ctx, rows), {}

    def samples(self, groups: list[Group], ctx: RolloutContext, model=None) -> tuple[list[Sample], dict]:
        out = []
        for gi, (g, adv) in enumerate(zip(groups, group_advantages(groups, self.cfg))):
            out += [Sample(g.prompt_ids, c.token_ids, c.logprobs, a, truncated=c.truncated,
                           token_weights=c.is_weights, hinted=g.level > 0, group=gi)
                    for c, a in zip(g.completions, adv)]
        return out, {}

    # ``before_update(mini_batch_samples, lm, first) -> metrics``: called before each optimiser step
    # (``fasthint.update.policy_update``); None = nothing to do. HINT sets its AAPO weights there.
    before_update = None

    # what this algorithm's ``auto``/unset settings become (TrainConfig.validate resolves them once,
    # so train_config.json records what ran); subclasses override entries
    defaults = {"adv_scale": "group", "loss_agg": "token-mean", "mask_truncated": False}

    def objective(self) -> list[Term]:
        """The per-token loss terms this algorithm trains with (``fasthint.loss``): GRPO's clipped
        surrogate (clip-higher, optional dual clip), the k3 KL penalty with ``--beta > 0`` and the
        entropy bonus with ``--entropy_coef > 0``."""
        c = self.cfg
        return clip_terms(c.eps_low, c.eps_high, c.dual_clip, c.beta, entropy_coef=c.entropy_coef)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


REGISTRY[Algorithm.name] = Algorithm


HINT_SHARES = ("parse_fail", "skipped", "reply_truncated", "retries", "leak_level_1", "leak_level_2", "leak_level_3")


def hint_stats(ctx: RolloutContext) -> dict:
    """``hint/requested`` and, as shares of the requests of the last call: ``hint/parse_fail`` (a reply
    that did not parse, or a malformed hint column), ``hint/skipped`` (no solution, request too long),
    ``hint/reply_truncated`` (a self-hint reply cut at ``--hint_max_new_tokens``), ``hint/retries``
    (requests asked again after a reply that did not parse, per request) and ``hint/leak_level_N``
    (level N stated the answer and was dropped with the stronger ones). Only what the provider measures:
    dataset hints have no replies to truncate or retry, so those are not logged as constant zeros."""
    st = getattr(ctx.hints, "stats", None) or {}
    req = st.get("requested", 0)
    return {"hint/requested": req, **{f"hint/{k}": st.get(k, 0) / req if req else 0.0 for k in HINT_SHARES
                                      if k in st or k == "parse_fail"}}  # what this provider measures


def group_metrics(groups: list[Group]) -> dict:
    """Hint rates per level and the zero-signal fraction before and after hinting."""
    n = max(1, len(groups))

    def zero_std(r: list[float]) -> bool:
        return max(r) == min(r)

    out = {"frac_reward_zero_std": sum(zero_std(g.rewards) for g in groups) / n,
           "frac_reward_zero_std/pre_hint": sum(zero_std(g.pre_hint_rewards or g.rewards) for g in groups) / n,
           "hint/rate": sum(g.level > 0 for g in groups) / n}
    for lvl in (1, 2, 3):
        out[f"hint/rate_level_{lvl}"] = sum(g.level == lvl for g in groups) / n
    return out


class SolveTracker:
    """``prompts/never_solved``: share of the training prompts seen so far that no completion has
    solved in any visit (hinted or not), the SAGE paper's Table 2 metric."""

    def __init__(self):
        self.seen: set[str] = set()
        self.solved: set[str] = set()

    def update(self, groups: list[Group]) -> float:
        for g in groups:
            self.seen.add(g.uid)
            before = g.pre_hint_correct or g.pre_hint_rewards
            if g.solved or (before and max(before) >= 1.0):
                self.solved.add(g.uid)
        return 1.0 - len(self.solved) / max(1, len(self.seen))

    def state_dict(self) -> dict:
        return {"seen": sorted(self.seen), "solved": sorted(self.solved)}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.solved = set(state["seen"]), set(state["solved"])
