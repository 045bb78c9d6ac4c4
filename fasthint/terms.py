"""The per-token terms of the policy objective, and how each reaches the kernel.

    loss = sum_t w_t * m_t * sum_k term_k(logp_t)          (docs/ALGORITHMS.md §1.4-1.5)

Each term is a small object whose ``loss(logp, tokens)`` is a function of each token's own log-prob
(plus per-token constants in :class:`Tokens`). It reaches the kernel in one of these forms
(:meth:`Term.lower`):

- a per-token coefficient in the fused epilogue: the term writes its part of ``PGSpec`` (the ratio
  clip, the shaped ratio, the k3 penalty, the entropy bonus, a weight) and the epilogue computes its
  value and ``dL/dlogp_t`` in the same pass as the log-probs (all four built-in terms);
- not at all: the objective then runs the composed path on CUDA (the kernels' log-probs, then the terms
  under autograd: one more pass over the ``[N]`` tokens, never over the logits), said once in the log.

Terms: :class:`ClippedSurrogate` (PPO/GRPO clip with clip-higher and dual clip), :class:`ShapedRatio`
(Guide: ``A r / (r + gamma)`` on hinted tokens), :class:`KLPenalty` (k3), :class:`EntropyBonus`
(``-coef H_t``; the one term that reads the entropy, whose gradient the kernels add when a term sets
``uses_entropy``). A new term is a subclass of :class:`Term` plus its test (docs/ARCHITECTURE.md);
an algorithm picks its terms in ``Algorithm.objective``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Tokens:
    """Per-token constants of the packed completion tokens, each ``[N]`` (no gradient)."""

    old_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    ref_logp: Optional[torch.Tensor] = None
    fields: dict = field(default_factory=dict)  # named per-token tensors a term reads (Guide: "gamma")
    entropy: Optional[torch.Tensor] = None  # the policy's per-token entropy (differentiable), for terms
    #                                          with ``uses_entropy``; set by the objective per chunk

    def prepared(self, dtype: torch.dtype) -> "Tokens":
        """In ``dtype``, zero off the mask (NaN or inf there must never reach a gradient)."""
        on = self.mask.bool()

        def c(x):
            return None if x is None else torch.where(on, x.detach().to(dtype), torch.zeros((), dtype=dtype,
                                                                                          device=x.device))
        return Tokens(c(self.old_logp), c(self.advantages), self.mask, c(self.ref_logp),
                      {k: c(v) for k, v in self.fields.items()})

    def rows(self, s: int, e: int, entropy: Optional[torch.Tensor] = None) -> "Tokens":
        """Rows ``s:e`` (what the kernels hand the objective one chunk at a time), with ``entropy``."""
        cut = (lambda x: None if x is None else x[s:e])  # noqa: E731
        return Tokens(cut(self.old_logp), cut(self.advantages), cut(self.mask), cut(self.ref_logp),
                      {k: cut(v) for k, v in self.fields.items()}, entropy)


class Term:
    """One per-token objective term. ``loss`` is minimised; ``stats`` are per-token values whose
    means over the mask are reported (keys are metric names). A term whose loss reads the policy's
    entropy (``t.entropy``) sets ``uses_entropy``: the kernels then compute it and its gradient."""

    uses_entropy = False
    sampler_stats = False  # its stats compare the trainer with the sampler: reported over unhinted tokens
    acts_without_advantage = False  # its loss is not zero on a sample whose advantage is 0 (KL, entropy bonus)

    @staticmethod
    def importance_weight(t: Tokens):
        """The truncated importance weight trainer/sampler of each token (field ``is_weight``, set when
        the engine's sampler is corrected), or 1: it scales policy-gradient terms only, never the KL."""
        return t.fields.get("is_weight", 1.0)

    def loss(self, logp: torch.Tensor, t: Tokens) -> torch.Tensor:
        raise NotImplementedError

    def stats(self, logp: torch.Tensor, t: Tokens) -> dict:
        return {}

    def lower(self, spec: dict, t: Tokens) -> bool:
        """How this term reaches the kernel: it writes its part of the fused epilogue's per-token
        objective into ``spec`` (``PGSpec``'s keyword arguments: a per-token coefficient of ``logp_t``,
        computed in the epilogue) and returns True, or returns False when it has no kernel form (the
        default). An objective with such a term runs the composed path on CUDA (the kernels' log-probs,
        then this loss under autograd: one more pass over the tokens, never over the logits), and says
        so once."""
        return False


@dataclass
class ClippedSurrogate(Term):
    """``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``, ``r = exp(logp - old)``; with ``dual_clip=c``
    the objective of a negative-advantage token is at least ``c A`` (Dual-clip PPO)."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: Optional[float] = None
    sampler_stats = True

    def objective(self, logp, t: Tokens) -> torch.Tensor:
        ratio = torch.exp(logp - t.old_logp)
        adv = t.advantages.to(logp.dtype)
        obj = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - self.eps_low, 1 + self.eps_high) * adv)
        if self.dual_clip is not None:
            obj = torch.where(adv < 0, torch.maximum(obj, self.dual_clip * adv), obj)
        return obj

    def loss(self, logp, t):
        return -self.objective(logp, t) * self.importance_weight(t)

    def stats(self, logp, t):
        ratio, adv = torch.exp(logp - t.old_logp), t.advantages
        return {"clip_ratio/low": ((ratio < 1 - self.eps_low) & (adv < 0)).to(logp.dtype),
                "clip_ratio/high": ((ratio > 1 + self.eps_high) & (adv > 0)).to(logp.dtype)}

    def lower(self, spec, t):
        """The epilogue's ratio clip (and dual clip), weighted by the importance weight when there is one."""
        if "eps_low" in spec:  # one policy-gradient term per objective in the epilogue
            return False
        iw = t.fields.get("is_weight")
        spec.update(eps_low=self.eps_low, eps_high=self.eps_high, dual_clip=self.dual_clip,
                    is_weights=iw if torch.is_tensor(iw) else None)
        return True


@dataclass
class ShapedRatio(Term):
    """Guide: tokens whose field ``gamma`` is > 0 (hinted completions) use the unclipped shaped
    objective ``A r / (r + gamma)``; the others use ``base``."""

    base: ClippedSurrogate = field(default_factory=ClippedSurrogate)
    sampler_stats = True

    def loss(self, logp, t):
        obj = self.base.objective(logp, t)
        gam = t.fields.get("gamma")
        if gam is not None:
            ratio, shaped = torch.exp(logp - t.old_logp), gam > 0
            adv = t.advantages.to(logp.dtype)
            obj = torch.where(shaped, adv * ratio / (ratio + torch.where(shaped, gam, 1.0)), obj)
        return -obj * self.importance_weight(t)

    def stats(self, logp, t):
        return self.base.stats(logp, t)

    def lower(self, spec, t):
        """The epilogue's shaped ratio on tokens whose ``gamma > 0``, its ratio clip elsewhere."""
        if type(self.base) is not ClippedSurrogate or not self.base.lower(spec, t):
            return False
        spec["gamma"] = t.fields.get("gamma")
        return True


@dataclass
class KLPenalty(Term):
    """``beta * k3`` with ``k3 = exp(ref - logp) - (ref - logp) - 1`` (no term without reference log-probs)."""

    beta: float = 0.0
    acts_without_advantage = True

    def k3(self, logp, t):
        d = t.ref_logp.to(logp.dtype) - logp
        return torch.exp(d) - d - 1

    def loss(self, logp, t):
        return self.beta * self.k3(logp, t) if t.ref_logp is not None and self.beta > 0 else torch.zeros_like(logp)

    def stats(self, logp, t):
        return {"kl": self.k3(logp, t)} if t.ref_logp is not None and self.beta > 0 else {}

    def lower(self, spec, t):
        """The epilogue's k3 penalty (nothing when there are no reference log-probs)."""
        if "ref_logp" in spec:
            return False
        on = t.ref_logp is not None and self.beta > 0
        spec.update(ref_logp=t.ref_logp if on else None, beta=self.beta if on else 0.0)
        return True


@dataclass
class EntropyBonus(Term):
    """``-coef * H_t``: rewards a spread-out next-token distribution (verl's ``entropy_coeff``)."""

    coef: float = 0.0
    uses_entropy = True
    acts_without_advantage = True

    def loss(self, logp, t):
        if t.entropy is None:
            raise ValueError("EntropyBonus needs the per-token entropy: pass entropy= to policy_loss")
        return -self.coef * t.entropy

    def lower(self, spec, t):
        """The epilogue's entropy bonus."""
        if "entropy_coef" in spec:
            return False
        spec["entropy_coef"] = self.coef
        return True


def clip_terms(eps_low: float = 0.2, eps_high: float = 0.28, dual_clip: Optional[float] = None,
               beta: float = 0.0, shaped: bool = False, entropy_coef: float = 0.0) -> list[Term]:
    """GRPO's objective: the clipped surrogate (Guide's shaped ratio around it when ``shaped``), k3 KL
    when ``beta > 0`` and an entropy bonus when ``entropy_coef > 0``."""
    pg = ClippedSurrogate(eps_low, eps_high, dual_clip)
    return ([ShapedRatio(pg) if shaped else pg] + ([KLPenalty(beta)] if beta > 0 else [])
            + ([EntropyBonus(entropy_coef)] if entropy_coef > 0 else []))
