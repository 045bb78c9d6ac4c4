"""What the fused policy-gradient kernel computes per token, named by operation, not by algorithm.

A :class:`PGSpec` is the objective after ``fasthint.loss`` has lowered its terms: per-token tensors and
the switches of ``fused_pg``'s epilogue. Each part is an operation on a token's log-prob:

- the ratio clip ``min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``, with an optional dual clip;
- the shaped ratio ``A r / (r + gamma)`` on tokens whose ``gamma > 0``;
- a per-token weight on the policy-gradient part (``is_weights``: truncated importance weights);
- the k3 penalty ``beta (e^(ref - logp) - (ref - logp) - 1)``;
- the entropy bonus ``-entropy_coef H_t``;

all times the aggregation weight ``weights`` (0 off the mask). The float64 oracle is
``reference.pg_loss_torch``; the kernel is ``fused_pg``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class PGSpec:
    """The per-token objective: tensors ``[N]`` (fp32) and scalars; ``None`` switches a part off."""

    old_logp: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor  # aggregation weight x mask (0 off the mask)
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: Optional[float] = None
    is_weights: Optional[torch.Tensor] = None  # per-token weight of the policy-gradient part only
    gamma: Optional[torch.Tensor] = None  # > 0: the shaped ratio on that token
    ref_logp: Optional[torch.Tensor] = None  # the k3 penalty's reference log-probs
    beta: float = 0.0  # the k3 penalty's coefficient
    entropy_coef: float = 0.0  # the entropy bonus's coefficient
