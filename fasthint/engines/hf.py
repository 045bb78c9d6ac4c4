"""Rollout engine on Hugging Face ``generate``: batched, left-padded, KV cache, shares the model.

The engine samples from the trainer's own module, so weight sync is free. Sampling log-probs are
computed from the raw logits at the sampling temperature (no top-p/top-k renormalisation), which is
what the trainer's loss computes too.
"""
from __future__ import annotations

import torch

from fasthint.engines.base import Completion, SamplingConfig


class HFEngine:
    """Generates with ``model.generate``; ``batch_size`` bounds the sequences per call."""

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

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        """``len(prompts) * sampling.n`` completions, prompt-major (prompt 0's n first)."""
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
        device = next(self.model.parameters()).device
        L = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), L), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, L - len(p):] = torch.tensor(p)
            attn[i, L - len(p):] = 1
        greedy = sp.temperature == 0
        kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=sp.temperature,
                                                           top_p=sp.top_p, top_k=0)
        res = self.model.generate(
            input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=sp.max_new_tokens,
            num_return_sequences=sp.n, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
            output_logits=True, return_dict_in_generate=True, use_cache=True,
            synced_gpus=False,  # under FSDP the trainer gathers the weights first: ranks generate alone
            **kwargs)
        gen = res.sequences[:, L:].cpu()
        temp = 1.0 if greedy else sp.temperature
        if gen.shape[1]:
            logits = torch.stack(res.logits, dim=1).float().cpu()  # [B*n, T, V]
            lp = torch.log_softmax(logits / temp, dim=-1).gather(-1, gen.unsqueeze(-1)).squeeze(-1)
        else:
            lp = torch.zeros(gen.shape)
        eos = torch.tensor(self.eos_ids)
        out = []
        for row in range(gen.shape[0]):
            toks = gen[row].tolist()
            is_eos = torch.isin(gen[row], eos).nonzero()
            end = int(is_eos[0]) + 1 if len(is_eos) else len(toks)
            out.append(Completion(prompt_index=offset + row // sp.n, token_ids=toks[:end],
                                  logprobs=lp[row, :end].tolist(), truncated=not len(is_eos)))
        return out
