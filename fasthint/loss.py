"""The policy objective's module layer: the LM and the fused head loss as one module, and the
no-grad log-probs of packed completions under any model.

:class:`PolicyLoss` is the causal LM plus ``ops.fused_policy_loss`` in one ``forward``, so that under
FSDP2 it is the root unit owning the embeddings, final norm and head; it applies the model's logit
transform (``fasthint.head``: Gemma-2's soft-cap, Cohere/Granite scales) so the loss sees the logits
the model samples from. ``micro_batch_logprobs`` and ``recompute_logprobs`` compute the same log-probs
without gradient (the KL reference, Guide's and HINT's no-hint numerators, TIS re-scoring).
"""
from __future__ import annotations

import torch

from fasthint import ops
from fasthint.batch import Sample, _collate
from fasthint.head import head_transform


class PolicyLoss(torch.nn.Module):
    """The causal LM plus the fused loss in one ``forward``: the FSDP root, so that its own
    parameters (embeddings, final norm, head) are gathered and their gradients reduced like any
    layer's. ``forward(input_ids, attention_mask, score_index, targets, autocast, **loss_kwargs)``
    returns ``ops.fused_policy_loss``'s (loss, stats) on the hidden states at ``score_index`` (the
    LM body under bfloat16 autocast when ``autocast``)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        self.head_transform = head_transform(lm.config)  # soft-cap / logit scale the loss must apply

    def forward(self, input_ids, attention_mask, score_index, targets, autocast: bool = False, **loss_kwargs):
        base = getattr(self.lm, self.lm.base_model_prefix)
        head = self.lm.get_output_embeddings()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if targets is None:  # hidden states only
            return hidden
        h = hidden.flatten(0, 1).index_select(0, score_index)
        loss_kwargs.update(self.head_transform.loss_kwargs(loss_kwargs.pop("temperature", 1.0)))
        return ops.fused_policy_loss(h, head.weight, targets, bias=head.bias, **loss_kwargs)


@torch.no_grad()
def micro_batch_logprobs(lm, mb, temperature: float, autocast: bool) -> torch.Tensor:
    """``lm``'s log-probs of ``mb``'s packed completion tokens, without gradient (the KL reference,
    Guide's and HINT's no-hint numerators)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        hidden = getattr(lm, lm.base_model_prefix)(
            input_ids=mb.input_ids, attention_mask=mb.attention_mask).last_hidden_state
    head = lm.get_output_embeddings()
    return ops.linear_logprobs(hidden.flatten(0, 1).index_select(0, mb.score_index), head.weight, mb.targets,
                               bias=head.bias, **head_transform(lm.config).loss_kwargs(temperature))


@torch.no_grad()
def recompute_logprobs(model, samples: list[Sample], cfg) -> list[torch.Tensor]:
    """Current-policy log-probs of each sample's completion in its ``prompt_ids`` context (fp32 CPU
    tensors, one per sample): Guide's and HINT's no-hint numerators before the update."""
    device = next(model.parameters()).device
    autocast = device.type == "cuda" and cfg.dtype != "float32"
    out: list[torch.Tensor] = []
    for s in range(0, len(samples), cfg.micro_batch_size):
        chunk = samples[s:s + cfg.micro_batch_size]
        mb = _collate(chunk, model.config.pad_token_id or 0, device)
        lp = micro_batch_logprobs(model, mb, cfg.temperature, autocast)
        out += list(lp.float().cpu().split([len(x.completion_ids) for x in chunk]))
    return out
