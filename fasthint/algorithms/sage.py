"""SAGE and SAGE-light: the policy writes its own hints (docs/ALGORITHMS.md §2).

SAGE, per step: (1) roll out ``G`` completions without hints; (2) for every prompt whose group is
all-zero, ask the hint provider (default: the current policy, through the rollout engine, from the
question and the reference solution) for hints at three strengths, fresh at every visit; (3) for
``l = 1..3`` re-sample ONLY the still-unresolved prompts with their level-``l`` hint, replace each
such prompt's whole group, and stop escalating a prompt once any completion succeeds.
``--sage_escalation sequential`` (default) makes one call per level with only the prompts still
unresolved, so it samples the fewest completions; ``parallel`` samples the failed prompts at every
level in one engine call and keeps each prompt's lowest successful level: the same groups in
distribution, one generation round instead of up to three, but more samples. A prompt still all-zero
at its strongest level (3, or the strongest its provider kept) keeps that group; a prompt without a
usable hint keeps its no-hint group.
All-correct groups are never hinted. Training is on the hinted context (hint tokens are part of the
prompt, so they are never scored); evaluation never uses hints.

SAGE-light: one rollout pass per step. A per-prompt level persists across visits: the first visit
has no hint; at each later visit the previous visit's accuracy ``<= sage_light_min_acc`` raises the
level by one (at most 3), ``> sage_light_max_acc`` lowers it by one (at least 0). Prompts at a level
above 0 are sampled with that level's hint. The levels are part of the algorithm's state (saved
with checkpoints).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fasthint.algorithms.base import Algorithm, Group, RolloutContext, hint_stats, sample_groups
from fasthint.algorithms.hint_providers import HintConfig
from fasthint.hints import HINT_LEVELS, at_level
from fasthint.options import Options, need, one_of, option

SAGE_ESCALATIONS = ("parallel", "sequential")


@dataclass
class SAGEConfig(Options):
    GROUP = "sage, sage_light"
    sage_escalation: str = option("sequential", f"sage: how unresolved prompts climb the hint levels, one of "
                                                f"{SAGE_ESCALATIONS}: sequential = one call per level with only "
                                                "the prompts still unresolved (fewest samples, as the paper); "
                                                "parallel = all levels in one engine call, keeping the lowest "
                                                "that succeeds (same groups, one round, more samples).")
    sage_light_min_acc: float = option(0.1, "sage_light: previous accuracy <= this raises the prompt's level.")
    sage_light_max_acc: float = option(0.35, "sage_light: previous accuracy > this lowers the prompt's level.")

    def check(self) -> None:
        one_of("sage_escalation", self.sage_escalation, SAGE_ESCALATIONS)
        need(0 <= self.sage_light_min_acc <= self.sage_light_max_acc <= 1,
             "--sage_light_min_acc/--sage_light_max_acc: need 0 <= min <= max <= 1 (defaults 0.1 and 0.35)")


class SAGE(Algorithm):
    name = "sage"
    options = (HintConfig, SAGEConfig)
    hint_provider_default = "self"

    def rollout(self, rows: list[dict], ctx: RolloutContext) -> tuple[list[Group], dict]:
        groups = {g.uid: g for g in sample_groups(ctx, rows)}
        failed = [g for g in groups.values() if g.all_zero]
        info = {"hint/requested": 0, "hint/parse_fail": 0.0}
        if not failed or ctx.hints is None:
            return list(groups.values()), info
        hints = dict(zip((g.uid for g in failed), ctx.hints.hints([g.row for g in failed])))
        info.update(hint_stats(ctx))
        pending = [g for g in failed if hints[g.uid] is not None]
        escalate = self._parallel if self.cfg.sage_escalation == "parallel" else self._sequential
        for old, new in escalate(pending, hints, ctx):
            groups[new.uid] = new.replacing(old)  # the whole group is replaced: groups stay pure
        return [groups[r["uid"]] for r in rows], info

    @staticmethod
    def _sequential(pending: list[Group], hints: dict, ctx: RolloutContext) -> list[tuple[Group, Group]]:
        """One engine call per level, each with only the prompts still all-zero: fewest samples. A
        prompt stops at its strongest available level (a level that stated the answer was dropped)."""
        out, todo = [], list(pending)
        for level in range(1, HINT_LEVELS + 1):
            if not todo:
                break
            redo = sample_groups(ctx, [g.row for g in todo], [hints[g.uid][level] for g in todo], level)
            nxt = []
            for old, new in zip(todo, redo):
                if not new.all_zero or level == max(hints[old.uid]):
                    out.append((old, new))
                else:
                    nxt.append(old)
            todo = nxt
        return out

    @staticmethod
    def _parallel(pending: list[Group], hints: dict, ctx: RolloutContext) -> list[tuple[Group, Group]]:
        """Every level in ONE engine call; each prompt keeps its lowest level with a success (else
        level 3). The level groups are independent draws, so the kept group has exactly the
        distribution of sequential escalation, in one generation round instead of up to three."""
        if not pending:
            return []
        plan = [(g, lv) for g in pending for lv in sorted(hints[g.uid])]  # every available level
        redo = sample_groups(ctx, [g.row for g, _ in plan], [hints[g.uid][lv] for g, lv in plan],
                             [lv for _, lv in plan])
        out, k = [], 0
        for old in pending:
            tries = redo[k:k + len(hints[old.uid])]
            k += len(tries)
            out.append((old, next((g for g in tries if not g.all_zero), tries[-1])))
        return out


class SAGELight(Algorithm):
    name = "sage_light"
    options = (HintConfig, SAGEConfig)
    hint_provider_default = "self"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.levels: dict[str, int] = {}      # uid -> current hint level
        self.last_acc: dict[str, float] = {}  # uid -> accuracy at the previous visit
        self.last_hints: dict[str, dict] = {}  # uid -> the last hint set the provider gave (SAGE's fallback)

    def next_level(self, uid: str) -> int:
        """The level for this visit, from the previous visit's accuracy (first visit: 0)."""
        if uid not in self.last_acc:
            return 0
        lvl, acc = self.levels.get(uid, 0), self.last_acc[uid]
        if acc <= self.cfg.sage_light_min_acc:
            return min(HINT_LEVELS, lvl + 1)
        if acc > self.cfg.sage_light_max_acc:
            return max(0, lvl - 1)
        return lvl

    def rollout(self, rows: list[dict], ctx: RolloutContext) -> tuple[list[Group], dict]:
        levels = {r["uid"]: self.next_level(r["uid"]) for r in rows}
        need = [r for r in rows if levels[r["uid"]] > 0]
        hint_text: dict[int, Optional[str]] = {}
        info = {"hint/requested": 0, "hint/parse_fail": 0.0}
        shown: dict[str, int] = {}
        if need and ctx.hints is not None:
            for r, h in zip(need, ctx.hints.hints(need)):
                uid = r["uid"]
                if h is not None:
                    self.last_hints[uid] = h
                # no hint this visit: the last good set, as SAGE's code falls back to it
                shown[uid], hint_text[uid] = at_level(h if h is not None else self.last_hints.get(uid), levels[uid])
            info.update(hint_stats(ctx))
        for r in need:  # the level shown, not the one planned: 0 when no hint could be had
            levels[r["uid"]] = shown.get(r["uid"], 0)
        texts = [hint_text.get(r["uid"]) for r in rows]
        groups = {g.uid: g for g in sample_groups(ctx, rows, texts, [levels[r["uid"]] for r in rows])}
        for r in rows:
            self.levels[r["uid"]] = levels[r["uid"]]
            self.last_acc[r["uid"]] = groups[r["uid"]].accuracy
        return [groups[r["uid"]] for r in rows], info

    def state_dict(self) -> dict:
        return {"levels": dict(self.levels), "last_acc": dict(self.last_acc),
                "last_hints": {u: {str(lv): t for lv, t in h.items()} for u, h in self.last_hints.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.levels = {str(k): int(v) for k, v in state.get("levels", {}).items()}
        self.last_acc = {str(k): float(v) for k, v in state.get("last_acc", {}).items()}
        self.last_hints = {str(u): {int(lv): t for lv, t in h.items()} for u, h in state.get("last_hints", {}).items()}
