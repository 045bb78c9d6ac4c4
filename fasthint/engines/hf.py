"""Rollout engine on a Hugging Face causal LM: batched, left-padded, KV cache, shares the model.

The engine samples from the trainer's own module, so weight sync is free. Its decode loop drops a
sequence from the batch and the KV cache as soon as it emits EOS (``generate`` keeps decoding
finished rows until the longest is done). Sampling log-probs are
computed from the raw logits at the sampling temperature (no top-p/top-k renormalisation), which is
what the trainer's loss computes too.
"""
from __future__ import annotations

import inspect
from typing import Optional

import numpy as np
import torch

from fasthint.engines.base import Completion, SamplingConfig, completion_seed


class HFEngine:
    """Samples from ``model`` with its own decode loop; ``batch_size`` bounds the sequences per call."""

    runs_policy = True  # samples from the trainer's module: rollouts run inside ``dist.gathered``

    def __init__(self, model, tokenizer, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        if not eos:
            raise ValueError("the tokenizer has no EOS token: set tokenizer.eos_token")
        self.eos_ids = eos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]

    def update_weights(self, model) -> None:
        self.model = model

    def sleep(self) -> None:
        """Nothing to free: the engine is the trainer's module."""

    def close(self) -> None:
        """Nothing to shut down."""

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        """``len(prompts) * sampling.n`` completions, prompt-major (prompt 0's n first)."""
        if sampling.seeds is not None and len(sampling.seeds) != len(prompts):
            raise ValueError(f"{len(sampling.seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
        per_call = max(1, self.batch_size // sampling.n)
        out: list[Completion] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, len(prompts), per_call):
                out.extend(self._generate_chunk(prompts[s:s + per_call], s, sampling))
        finally:
            self.model.train(was_training)
        return out

    def _generate_chunk(self, prompts: list[list[int]], offset: int, sp: SamplingConfig) -> list[Completion]:
        """Left-padded prefill, then one token per step for the sequences still running: a sequence
        that has emitted EOS leaves the batch (and the KV cache), so the work follows the sampled
        tokens rather than ``batch x longest completion``."""
        device = next(self.model.parameters()).device
        L = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), L), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, L - len(p):] = torch.tensor(p)
            attn[i, L - len(p):] = 1
        ids, attn = ids.repeat_interleave(sp.n, 0).to(device), attn.repeat_interleave(sp.n, 0).to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache_kw = _cache_argument(self.model)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, logits, next_pos = _output_cache(out), out.logits[:, -1], pos[:, -1] + 1
        alive = torch.arange(ids.shape[0])  # original row of each running sequence
        toks: list[list[int]] = [[] for _ in range(ids.shape[0])]
        lps: list[list[float]] = [[] for _ in range(ids.shape[0])]
        eos = torch.tensor(self.eos_ids, device=device)
        seeded = sp.seeds is not None and sp.temperature > 0
        row_seeds = np.array([completion_seed(sp.seeds[offset + r // sp.n], r % sp.n) for r in range(ids.shape[0])]
                             if seeded else [], dtype=np.uint64)
        for t in range(sp.max_new_tokens):
            tok, lp = _sample(logits, sp, _uniforms(row_seeds[alive.numpy()], t) if seeded else None)
            for r, a, b in zip(alive.tolist(), tok.tolist(), lp.tolist()):
                toks[r].append(a)
                lps[r].append(b)
            running = ~torch.isin(tok, eos)
            if t == sp.max_new_tokens - 1 or not running.any():
                break
            if not running.all():
                keep = running.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                alive, attn, tok, next_pos = alive[keep.cpu()], attn[keep], tok[keep], next_pos[keep]
            attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
            out = self.model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                             use_cache=True, **{cache_kw: cache})
            cache, logits, next_pos = _output_cache(out), out.logits[:, -1], next_pos + 1
        eos_set = set(self.eos_ids)
        return [Completion(prompt_index=offset + row // sp.n, token_ids=toks[row], logprobs=lps[row],
                           truncated=toks[row][-1] not in eos_set) for row in range(len(toks))]


def _cache_argument(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` since transformers 5.24 (where
    ``past_key_values`` is deprecated, to be removed in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(out):
    """The KV cache an output carries, under its current or its older name."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def _uniforms(row_seeds: np.ndarray, step: int) -> np.ndarray:
    """One uniform in [0, 1) per row for decode step ``step``: a counter-based draw (splitmix64 of the
    row's seed and the step, vectorised in uint64, which wraps), so a row's draws depend on nothing else."""
    with np.errstate(over="ignore"):
        x = row_seeds * np.uint64(0x9E3779B97F4A7C15) + np.uint64(step) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _sample(logits: torch.Tensor, sp: SamplingConfig,
            uniforms: Optional[np.ndarray] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens and their log-probs at the sampling temperature (raw logits for greedy; nucleus
    filtering, when ``top_p < 1``, changes what is drawn but not the reported log-prob). ``uniforms``
    (one per row): inverse-CDF draws in float64 instead of ``torch.multinomial`` and the global RNG."""
    logits = logits.float()
    if sp.temperature == 0:
        logp = torch.log_softmax(logits, -1)
        tok = logits.argmax(-1)
    else:
        logp = torch.log_softmax(logits / sp.temperature, -1)
        probs = logp.exp()
        if sp.top_p < 1.0:  # keep the smallest set of most likely tokens with mass >= top_p
            sorted_p, order = probs.sort(-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= sp.top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        if uniforms is None:
            tok = torch.multinomial(probs, 1).squeeze(1)
        else:  # the first token whose cumulative mass exceeds u * total (a zero-mass token never does)
            cdf = probs.double().cumsum(-1)
            x = torch.as_tensor(uniforms, device=cdf.device)[:, None] * cdf[:, -1:]
            tok = torch.searchsorted(cdf, x, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(1)
