"""What a model does to its logits after ``lm_head``, read from its config.

The fused loss computes log-probs from the last hidden states, so it must apply the same transform
as the model: ``softcap(scale * lm_head(h))``. Supported: Gemma-2/3's final-logit soft-cap
(``c tanh(z / c)``), Cohere's ``logit_scale`` and Granite's ``logits_scaling``; other logit changes a
config names are refused with one line rather than silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fasthint.errors import ModelError


@dataclass(frozen=True)
class HeadTransform:
    """What a model does to ``lm_head(h)`` before the softmax: ``softcap(scale * logits)``, where
    ``softcap(z) = c tanh(z / c)`` (Gemma-2/3's ``final_logit_softcapping``) or the identity."""

    scale: float = 1.0
    softcap: Optional[float] = None

    def loss_kwargs(self, temperature: float) -> dict:
        """The head kernels' ``temperature`` and ``softcap`` for sampling ``temperature``: a scale
        folds into the temperature (log_softmax(s z / T) = log_softmax(z / (T / s)), bias included)."""
        kw: dict = {"temperature": temperature / self.scale}
        if self.softcap is not None:
            kw["softcap"] = self.softcap
        return kw

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The transform on materialised logits (the start-up check; tests)."""
        z = logits * self.scale
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)


# Model types whose head multiplies (scale) or divides (1 / scale) the logits, as transformers applies it.
_LOGIT_SCALE = {"cohere": ("logit_scale", False), "cohere2": ("logit_scale", False),
                "granite": ("logits_scaling", True), "granitemoe": ("logits_scaling", True),
                "granitemoeshared": ("logits_scaling", True), "granitemoehybrid": ("logits_scaling", True)}
# Config fields that change the logits in other ways: refused rather than silently ignored.
_UNSUPPORTED_HEAD_FIELDS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "logits_mup_width_multiplier",
                            "output_multiplier")


def head_transform(config) -> HeadTransform:
    """The logit transform of ``config``'s head that the fused loss must apply, read from the config;
    ModelError for one it does not apply."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = 1.0
    if config.model_type in _LOGIT_SCALE:
        name, divide = _LOGIT_SCALE[config.model_type]
        value = float(getattr(config, name))
        scale = 1.0 / value if divide else value
    else:
        for name in _UNSUPPORTED_HEAD_FIELDS:
            value = getattr(config, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1:
                raise ModelError(f"{config.model_type} changes its logits with config.{name} = {value}, which the "
                                 "fused loss does not apply: this model type is not supported yet")
    if softcap is not None and scale != 1.0:
        raise ModelError(f"{config.model_type} both scales and soft-caps its logits: not supported by the fused loss")
    if scale <= 0:
        raise ModelError(f"{config.model_type}: logit scale {scale} must be > 0: check the model's config")
    return HeadTransform(scale=scale, softcap=float(softcap) if softcap else None)
