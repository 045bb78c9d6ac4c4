"""The policy objective, written once: per-token terms (``fasthint.terms``), their aggregation, and the
loss module.

    loss = sum_t w_t * m_t * sum_k term_k(logp_t)          (docs/ALGORITHMS.md §1.4-1.5)

``w_t`` is the aggregation weight (token-mean, seq-mean-token-mean or seq-mean-token-sum-norm, with the
global normaliser) times the sample/importance weight; ``m_t`` the mask. Because every term depends on
``logp_t`` alone, the head kernels need from the objective only ``dL/dlogp_t``, one coefficient per
token. :meth:`Objective.lower` asks each term for its kernel form (``Term.lower``): the built-in terms
become the fused epilogue's operations (``PGSpec``); an objective with a term that has none hands
``ops.fused_linear_loss`` the summed terms as a closure. Either way the kernels never see an
algorithm's concept.

:class:`PolicyLoss` is the causal LM plus the fused loss in one ``forward`` (the FSDP root);
``micro_batch_logprobs`` and ``recompute_logprobs`` give the same log-probs without gradient.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fasthint import dist, ops
from fasthint.batch import Sample, _collate, _collate_packed
from fasthint.head import head_transform
from fasthint.packing import packed_model_kwargs
from fasthint.terms import (ClippedSurrogate, EntropyBonus, KLPenalty, ShapedRatio, Term,  # noqa: F401 - re-exported
                            Tokens, clip_terms)
from fasthint.options import Options, need, one_of, option

log = logging.getLogger("fasthint")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ADV_SCALES = ("group", "batch", "none")


@dataclass
class LossConfig(Options):
    """Advantages and the policy objective. ``auto`` values are the algorithm's (``Algorithm.defaults``)."""

    GROUP = "advantages and loss"
    adv_scale: str = option("auto", f"advantage scaling, one of {ADV_SCALES}; auto = 'none' for dr_grpo, "
                                    "else 'group'.")
    adv_eps: float = option(1e-6, "epsilon added to the std in the advantage.")
    loss_agg: str = option("auto", f"loss aggregation, one of {LOSS_AGGS}; auto = "
                                   "'seq-mean-token-sum-norm' for dr_grpo, else 'token-mean'.")
    eps_low: float = option(0.2, "lower clip range: ratio >= 1 - eps_low.")
    eps_high: float = option(0.28, "upper clip range: ratio <= 1 + eps_high (DAPO clip-higher).")
    dual_clip: Optional[float] = option(None, "dual-clip constant c (e.g. 3.0) for negative advantages; "
                                              "unset = off.")
    beta: float = option(0.0, "k3 KL coefficient to a frozen reference model; 0 loads no reference.")
    entropy_coef: float = option(0.0, "entropy bonus: the loss gains -entropy_coef * (token entropy) "
                                      "(verl's entropy_coeff; 0 = off).")
    mask_truncated: Optional[bool] = option(None, "give truncated completions no loss (DAPO's overlong "
                                                  "masking); unset = on for dapo only.")
    head_grad_filter: float = option(0.0, "Triton head kernel (CUDA): skip the gradient work of vocabulary tiles "
                                          "whose every probability is below this (Cut Cross-Entropy's filter; "
                                          "2**-12 = 0.000244 is below bf16's resolution; it runs the atomic "
                                          "backward); 0 = exact.")

    def check(self) -> None:
        one_of("loss_agg", self.loss_agg, LOSS_AGGS)
        one_of("adv_scale", self.adv_scale, ADV_SCALES)
        need(0 <= self.eps_low < 1, f"--eps_low must be in [0, 1) (got {self.eps_low})")
        need(self.eps_high >= 0, f"--eps_high must be >= 0 (got {self.eps_high})")
        need(self.dual_clip is None or self.dual_clip > 1,
             f"--dual_clip must be > 1 (e.g. 3.0) or unset (got {self.dual_clip})")
        need(self.beta >= 0, f"--beta must be >= 0 (got {self.beta})")
        need(self.entropy_coef >= 0, f"--entropy_coef must be >= 0 (got {self.entropy_coef})")
        need(self.adv_eps > 0, f"--adv_eps must be > 0 (got {self.adv_eps})")
        need(0 <= self.head_grad_filter < 1, f"--head_grad_filter must be in [0, 1) (got {self.head_grad_filter})")


def token_weights(mask: torch.Tensor, loss_agg: str, *, num_tokens: Optional[float] = None,
                  seq_ids: Optional[torch.Tensor] = None, num_seqs: Optional[float] = None,
                  seq_weights: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-token aggregation factor ``w_t`` (0 off the mask), times ``seq_weights`` when given.

    ``token-mean``: 1 / num_tokens (default: mask.sum()); ``seq-mean-token-mean``: 1 / (tokens of the
    sequence x num_seqs) (default: sequences present); ``seq-mean-token-sum-norm``: 1 / num_tokens, where
    the caller passes batch size x max completion length. ``num_tokens``/``num_seqs`` are global when a
    batch is split over micro-batches or ranks."""
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    m = mask.to(dtype)
    if loss_agg == "seq-mean-token-mean":
        if seq_ids is None:
            raise ValueError("loss_agg='seq-mean-token-mean' needs seq_ids (the sequence index of each token)")
        n_seq = int(seq_ids.max().item()) + 1 if seq_ids.numel() else 0
        cnt = torch.zeros(n_seq, dtype=dtype, device=m.device).index_add_(0, seq_ids, m)
        denom = float(num_seqs) if num_seqs is not None else float((cnt > 0).sum().item())
        w = m / (cnt.clamp_min(1)[seq_ids] * max(denom, 1.0))
    else:
        denom = float(num_tokens) if num_tokens is not None else float(m.sum().item())
        w = m / max(denom, 1.0)
    if seq_weights is not None:
        w = w * seq_weights.to(dtype)
    return w


_COMPOSED: set = set()  # the term types already said to run the composed path


def _say_composed(term: Term) -> None:
    name = type(term).__name__
    if name not in _COMPOSED:
        _COMPOSED.add(name)
        log.info("objective term %s has no kernel form (Term.lower): the head runs the composed path (the "
                 "kernels' log-probs, then the terms under autograd)", name)


@dataclass
class Objective:
    """The policy loss of one batch of tokens, ready for the kernels: ``token_loss(logp_rows, start,
    stop)`` is ``w_t * sum_k term_k(logp_t)`` (0 off the mask), ``stats(logp)`` the terms' token means."""

    terms: list
    tokens: Tokens
    weights: torch.Tensor

    @property
    def uses_entropy(self) -> bool:
        return any(t.uses_entropy for t in self.terms)

    def token_loss(self, lp: torch.Tensor, s: int, e: int, entropy: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = self.tokens.rows(s, e, entropy)
        tok = self.terms[0].loss(lp, t)
        for term in self.terms[1:]:
            tok = tok + term.loss(lp, t)
        on = self.tokens.mask[s:e].bool()
        return torch.where(on, tok * self.weights[s:e], torch.zeros_like(tok))  # NaN/inf off the mask stay out

    def lower(self) -> Optional[ops.PGSpec]:
        """The objective as the kernels' epilogue computes it (``ops.fused_linear_loss(pg_spec=...)``): each
        term lowers itself (:meth:`Term.lower`). None when a term has no kernel form or no term is a
        policy-gradient one: the kernels then get ``token_loss`` as a closure (said once per term type)."""
        spec: dict = {}
        for term in self.terms:
            if not term.lower(spec, self.tokens):
                _say_composed(term)
                return None
        if "eps_low" not in spec:  # the epilogue is built around a ratio: no policy-gradient term, no kernel form
            _say_composed(self.terms[0])
            return None
        t = self.tokens
        return ops.PGSpec(t.old_logp, t.advantages, torch.where(t.mask.bool(), self.weights, 0.0), **spec)

    @torch.no_grad()
    def stats(self, logp: torch.Tensor, sampler_mask: Optional[torch.Tensor] = None) -> dict:
        """Each term's stats as means over the trained tokens (0-dim tensors); the stats of terms with
        ``sampler_stats`` (clip ratios) over the tokens of ``sampler_mask`` among them when given (the
        unhinted tokens: a hinted token's ratio is not the sampler's)."""
        logp = logp.detach()
        trained = self.tokens.mask.bool()
        masks = {False: trained, True: trained if sampler_mask is None else trained & sampler_mask.bool()}
        out = {"clip_ratio/low": logp.new_zeros(()), "clip_ratio/high": logp.new_zeros(()), "kl": logp.new_zeros(())}
        for term in self.terms:
            on = masks[term.sampler_stats]
            n = on.to(logp.dtype).sum().clamp_min(1)
            for k, v in term.stats(logp, self.tokens).items():
                out[k] = torch.where(on, v, torch.zeros_like(v)).sum() / n
        return out


def make_objective(old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                   dtype: torch.dtype = torch.float32, ref_logp: Optional[torch.Tensor] = None,
                   terms: Optional[Sequence[Term]] = None, beta: float = 0.0, eps_low: float = 0.2,
                   eps_high: float = 0.28, dual_clip: Optional[float] = None, loss_agg: str = "token-mean",
                   num_tokens: Optional[float] = None, seq_ids: Optional[torch.Tensor] = None,
                   num_seqs: Optional[float] = None, seq_weights: Optional[torch.Tensor] = None,
                   shaped_gamma: Optional[torch.Tensor] = None, token_fields: Optional[dict] = None) -> Objective:
    """The :class:`Objective` of ``[N]`` packed tokens, computed in ``dtype``.

    ``terms``: default :func:`clip_terms` from ``eps_low``/``eps_high``/``dual_clip``/``beta`` (Guide's
    shaped ratio when ``shaped_gamma`` is given); pass either ``terms`` or those settings. Aggregation
    as :func:`token_weights`; ``mask`` is 1 on trained completion tokens; ``token_fields`` are named
    per-token tensors for the terms (``shaped_gamma`` is the field ``gamma``)."""
    if terms is None:
        terms = clip_terms(eps_low, eps_high, dual_clip, beta, shaped=shaped_gamma is not None)
    elif (beta, eps_low, eps_high, dual_clip) != (0.0, 0.2, 0.28, None):
        raise ValueError("pass either terms= or the clipped-surrogate settings (beta, eps_low, eps_high, "
                         "dual_clip), not both: the terms carry their own settings")
    if not terms:
        raise ValueError("terms= is empty: the objective needs at least one term")
    fields = dict(token_fields or {})
    if shaped_gamma is not None:
        fields["gamma"] = shaped_gamma
    tokens = Tokens(old_logp, advantages, mask, ref_logp, fields).prepared(dtype)
    w = token_weights(mask, loss_agg, num_tokens=num_tokens, seq_ids=seq_ids, num_seqs=num_seqs,
                      seq_weights=seq_weights, dtype=dtype)
    return Objective(list(terms), tokens, w)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                entropy: Optional[torch.Tensor] = None, **objective_kwargs):
    """The policy loss on given log-probs ``[N]`` (differentiable in ``logp`` and ``entropy``, the
    per-token entropy an entropy term reads): ``(loss, stats)`` with stats ``clip_ratio/low``,
    ``clip_ratio/high``, ``kl`` (token means). Keywords: :func:`make_objective`."""
    obj = make_objective(old_logp, advantages, mask, dtype=logp.dtype, **objective_kwargs)
    return obj.token_loss(logp, 0, logp.shape[0], entropy).sum(), obj.stats(logp)


def fused_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      advantages: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor, *,
                      bias: Optional[torch.Tensor] = None, temperature: float = 1.0, return_entropy: bool = False,
                      impl: str = "auto", softcap: Optional[float] = None,
                      sampler_mask: Optional[torch.Tensor] = None, grad_filter: Optional[float] = None,
                      **objective_kwargs):
    """:func:`policy_loss` of the log-probs of a linear head (``ops.linear_logprobs``), without ``[N, V]``
    logits: the objective goes to ``ops.fused_linear_loss`` as one closure. ``(loss, stats)``; stats add
    ``logp`` and, with ``return_entropy``, ``entropy`` (per token, detached); ``sampler_mask``: see
    :meth:`Objective.stats`; ``grad_filter``: ``ops.fused_linear_loss``'s. Keywords: :func:`make_objective`."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    obj = make_objective(old_logp, advantages, mask, dtype=acc, **objective_kwargs)
    loss, logp, ent = ops.fused_linear_loss(hidden, weight, targets, obj.token_loss, bias=bias,
                                            temperature=temperature, return_entropy=return_entropy, impl=impl,
                                            softcap=softcap, uses_entropy=obj.uses_entropy,
                                            pg_spec=obj.lower() if hidden.is_cuda or impl == "triton" else None,
                                            grad_filter=grad_filter)
    stats = obj.stats(logp, sampler_mask)
    stats["logp"] = logp
    if ent is not None:
        stats["entropy"] = ent
    return loss, stats


class PolicyLoss(torch.nn.Module):
    """The causal LM plus :func:`fused_policy_loss` in one ``forward``: the FSDP root, so that its own
    parameters (embeddings, final norm, head) are gathered and their gradients reduced like any
    layer's. ``forward(input_ids, attention_mask, score_index, targets, autocast, **loss_kwargs)``
    returns (loss, stats) on the hidden states at ``score_index`` (the LM body under bfloat16 autocast
    when ``autocast``, see :func:`autocast_bf16`), applying the model's logit transform
    (``fasthint.head``: Gemma-2's soft-cap, Cohere/Granite scales) so the loss sees the logits the
    model samples from."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        self.head_transform = head_transform(lm.config)

    def forward(self, input_ids, attention_mask, score_index, targets, autocast: bool = False,
                model_kwargs: Optional[dict] = None, **loss_kwargs):
        base = getattr(self.lm, self.lm.base_model_prefix)
        head = self.lm.get_output_embeddings()
        inputs = model_kwargs if model_kwargs is not None else {"attention_mask": attention_mask}
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            hidden = base(input_ids=input_ids, use_cache=False, **inputs).last_hidden_state
        if targets is None:  # hidden states only
            return hidden
        h, weight, bias = head_inputs(hidden.flatten(0, 1).index_select(0, score_index), head, autocast)
        loss_kwargs.update(self.head_transform.loss_kwargs(loss_kwargs.pop("temperature", 1.0)))
        return fused_policy_loss(h, weight, targets, bias=bias, **loss_kwargs)


def head_inputs(hidden: torch.Tensor, head: torch.nn.Module, autocast: bool) -> tuple:
    """(hidden states, weight, bias) as the head's kernels get them. Under single-process ``--bf16``
    autocast (which leaves the final norm and the head in fp32) they are cast to bf16, as FSDP's bf16
    mixed precision hands them over (``dist.shard``), so both paths run the same bf16 kernels; the fp32
    master weight gets its gradient through the cast."""
    if not autocast:
        return hidden, head.weight, head.bias
    bf16 = torch.bfloat16
    return hidden.to(bf16), head.weight.to(bf16), None if head.bias is None else head.bias.to(bf16)


def model_inputs(lm, mb) -> dict:
    """The model's keyword inputs for micro-batch ``mb`` besides ``input_ids``: the attention mask of
    a padded one; positions, boundaries and what ``lm``'s attention needs of a packed one."""
    if mb.packed:
        return packed_model_kwargs(mb.position_ids, mb.cu_seq_lens, mb.max_length, lm.config._attn_implementation)
    return {"attention_mask": mb.attention_mask}


def autocast_bf16(cfg) -> bool:
    """Whether the trainer's forwards autocast to bfloat16: ``--bf16`` in one process. Under FSDP
    ``--bf16`` is FSDP's mixed precision instead (``fasthint.dist.shard``): the parameters themselves
    are bf16 during forward and backward, so nothing autocasts. The two differ where autocast keeps
    fp32: the residual stream, norms and the head stay fp32 under autocast, bf16 under FSDP."""
    return bool(cfg.bf16) and dist.world_size() == 1


@torch.no_grad()
def micro_batch_logprobs(lm, mb, temperature: float, autocast: bool) -> torch.Tensor:
    """``lm``'s log-probs of ``mb``'s packed completion tokens, without gradient (the KL reference,
    Guide's and HINT's no-hint numerators)."""
    with torch.autocast(mb.input_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        hidden = getattr(lm, lm.base_model_prefix)(input_ids=mb.input_ids, use_cache=False,
                                                   **model_inputs(lm, mb)).last_hidden_state
    h, weight, bias = head_inputs(hidden.flatten(0, 1).index_select(0, mb.score_index), lm.get_output_embeddings(),
                                  autocast)
    return ops.linear_logprobs(h, weight, mb.targets, bias=bias, **head_transform(lm.config).loss_kwargs(temperature))


def token_capped_chunks(samples: list[Sample], max_seqs: int, max_tokens: int = 0,
                        packed: bool = False) -> list[list[Sample]]:
    """``samples`` cut in order into runs of at most ``max_seqs`` sequences and, when ``max_tokens > 0``,
    at most ``max_tokens`` tokens: padded, sequences x the longest; ``packed``, their sum (what
    ``batch.make_micro_batches`` counts). A sample longer than the budget is a run of its own."""
    out: list[list[Sample]] = []
    run: list[Sample] = []
    longest = total = 0
    for s in samples:
        n = len(s.prompt_ids) + len(s.completion_ids)
        grown = total + n if packed else (len(run) + 1) * max(longest, n)
        if run and (len(run) == max_seqs or (max_tokens > 0 and grown > max_tokens)):
            out.append(run)
            run, longest, total = [], 0, 0
        run.append(s)
        longest, total = max(longest, n), total + n
    return out + ([run] if run else [])


@torch.no_grad()
def recompute_logprobs(model, samples: list[Sample], cfg) -> list[torch.Tensor]:
    """Current-policy log-probs of each sample's completion in its ``prompt_ids`` context (fp32 CPU
    tensors, one per sample, in order): the old log-probs of a multi-step update, Guide's and HINT's
    no-hint numerators. Forwards are capped like the update's micro-batches: ``micro_batch_size``
    sequences and ``micro_batch_tokens`` tokens (a no-grad forward of a 7B at 64 x 10k tokens would
    need tens of GB for its MLP intermediates alone)."""
    device = next(model.parameters()).device
    autocast = autocast_bf16(cfg)
    packed = bool(getattr(cfg, "padding_free", False))
    out: list[torch.Tensor] = []
    for chunk in token_capped_chunks(samples, cfg.micro_batch_size, getattr(cfg, "micro_batch_tokens", 0), packed):
        mb = _collate_packed(chunk, device) if packed else _collate(chunk, model.config.pad_token_id or 0, device)
        lp = micro_batch_logprobs(model, mb, cfg.temperature, autocast)
        out += list(lp.float().cpu().split([len(x.completion_ids) for x in chunk]))
    return out
