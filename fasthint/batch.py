"""From scored completions to training micro-batches.

A :class:`Sample` is one completion in its training context: ``prompt_ids`` (the context the loss
conditions on; hint tokens, when any, are part of it and never scored) followed by the completion.
Micro-batches are right-padded, length-sorted groups of samples, or (``--padding_free``) one row of
concatenated sequences without padding (``fasthint.packing``); either way the loss sees only the
packed ``[N]`` stream of completion tokens (padding and prompt tokens cost no loss work).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Sample:
    """One completion to train on."""

    prompt_ids: list[int]
    completion_ids: list[int]
    old_logprobs: list[float]
    advantage: float
    weight: float = 1.0
    gamma: float = 0.0  # > 0: Guide's shaped, unclipped objective A r / (r + gamma) for this completion
    truncated: bool = False  # cut by max_new_tokens (DAPO's overlong masking drops it)
    hinted: bool = False  # sampled with a hint: left out of the sampler/trainer mismatch and clip metrics
    token_weights: Optional[list[float]] = None  # truncated importance weights trainer/sampler (TIS), per token:
    #                                               they scale the policy-gradient term only (fasthint.loss)
    group: int = 0  # index of its prompt's group in the batch: mini-batches keep groups whole
    keep_old_logprobs: bool = False  # its old log-probs are a behaviour policy in another context (Guide's
    #                                  hinted completions): the trainer's recompute leaves them alone


@dataclass
class MicroBatch:
    """Padded inputs ``[B, L]`` plus the packed scored-token stream ``[N]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    score_index: torch.Tensor  # [N] flat positions in [B*L] whose hidden state predicts a completion token
    targets: torch.Tensor      # [N]
    old_logp: torch.Tensor     # [N]
    advantages: torch.Tensor   # [N]
    weights: torch.Tensor      # [N]
    seq_ids: torch.Tensor      # [N] local sequence index
    num_seqs: int
    gamma: Optional[torch.Tensor] = None  # [N] Guide's shaping constant (None: no shaped sample)
    is_weights: Optional[torch.Tensor] = None  # [N] TIS weights (None: no sample has them)
    hinted: Optional[torch.Tensor] = None  # [N] 1 on tokens of hinted samples (None: no hinted sample)
    position_ids: Optional[torch.Tensor] = None  # packed (padding-free): [1, T], restarting per sequence
    cu_seq_lens: Optional[torch.Tensor] = None   # packed: [S + 1] sequence boundaries in the row
    max_length: int = 0                          # packed: the longest sequence

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def num_input_tokens(self) -> int:
        """Tokens the model runs on, padding included."""
        return self.input_ids.numel()


def split_mini_batches(samples: list[Sample], n: int) -> list[list[Sample]]:
    """``n`` mini-batches (one optimiser step each) of whole groups, in order, with group counts as
    equal as they can be; some are empty when there are fewer than ``n`` groups."""
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    keys = list(groups)
    bounds = [round(i * len(keys) / n) for i in range(n + 1)]
    return [[s for k in keys[bounds[i]:bounds[i + 1]] for s in groups[k]] for i in range(n)]


def make_micro_batches(samples: list[Sample], micro_batch_size: int, pad_id: int,
                       device: Optional[torch.device] = None, max_tokens: int = 0,
                       packed: bool = False) -> list[MicroBatch]:
    """Micro-batches of at most ``micro_batch_size`` sequences and, when ``max_tokens > 0``, at most
    ``max_tokens`` tokens (a sequence longer than the budget gets a micro-batch of its own).

    Padded (default): samples sorted by length, cut in order; the budget counts padded tokens
    (sequences x the longest). ``packed``: each micro-batch is one row without padding
    (:func:`_collate_packed`); the budget counts real tokens and the sequences are placed first-fit
    decreasing, so the micro-batches come out full and few."""
    def length(s: Sample) -> int:
        return len(s.prompt_ids) + len(s.completion_ids)

    if packed:
        bins: list[list[Sample]] = []
        room: list[int] = []
        for s in sorted(samples, key=length, reverse=True):
            n = length(s)
            k = next((i for i, r in enumerate(room) if len(bins[i]) < micro_batch_size
                      and (max_tokens <= 0 or n <= r)), None)
            if k is None:
                bins.append([])
                room.append(max_tokens)
                k = len(bins) - 1
            bins[k].append(s)
            room[k] -= n
        return [_collate_packed(b, device) for b in bins]
    out, group = [], []
    for s in sorted(samples, key=length):  # ascending: the newest sample is the longest of its group
        full = len(group) == micro_batch_size or (max_tokens > 0 and (len(group) + 1) * length(s) > max_tokens)
        if group and full:
            out.append(_collate(group, pad_id, device))
            group = []
        group.append(s)
    if group:
        out.append(_collate(group, pad_id, device))
    return out


def _collate_packed(group: list[Sample], device: Optional[torch.device]) -> MicroBatch:
    """``group`` as one row ``[1, T]`` with restarting positions and boundaries (no padding); the
    per-token fields as in :func:`_collate`, sequence ``b`` starting at ``cu_seq_lens[b]``."""
    lens = [len(x.prompt_ids) + len(x.completion_ids) for x in group]
    cu = [0, *itertools.accumulate(lens)]
    mb = _collate(group, 0, device, row_start=cu.__getitem__)
    mb.input_ids = torch.tensor([[t for x in group for t in x.prompt_ids + x.completion_ids]], device=device)
    mb.attention_mask = None
    mb.position_ids = torch.tensor([[p for n in lens for p in range(n)]], device=device)
    mb.cu_seq_lens = torch.tensor(cu, device=device)
    mb.max_length = max(lens)
    return mb


def _collate(group: list[Sample], pad_id: int, device: Optional[torch.device],
             row_start=None) -> MicroBatch:
    """Right-padded ``[B, L]``; ``row_start(b)``: where sequence ``b`` starts in the flat input
    (default ``b * L``; the packed layout passes its own)."""
    L = max(len(x.prompt_ids) + len(x.completion_ids) for x in group)
    start = row_start or (lambda b: b * L)
    ids = torch.full((len(group), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(group), L), dtype=torch.long)
    index, targets, old, adv, w, sid, gam, isw, hin = [], [], [], [], [], [], [], [], []
    for b, x in enumerate(group):
        seq = x.prompt_ids + x.completion_ids
        ids[b, :len(seq)] = torch.tensor(seq)
        attn[b, :len(seq)] = 1
        p, c = len(x.prompt_ids), len(x.completion_ids)
        index.extend(start(b) + p - 1 + j for j in range(c))  # hidden at p-1+j predicts completion token j
        targets.extend(x.completion_ids)
        old.extend(x.old_logprobs)
        adv.extend([x.advantage] * c)
        w.extend([x.weight] * c)
        isw.extend(x.token_weights if x.token_weights is not None else [1.0] * c)
        hin.extend([float(x.hinted)] * c)
        sid.extend([b] * c)
        gam.extend([x.gamma] * c)

    def t(v, dtype):
        return torch.tensor(v, dtype=dtype, device=device)

    return MicroBatch(ids.to(device), attn.to(device), t(index, torch.long), t(targets, torch.long),
                      t(old, torch.float32), t(adv, torch.float32), t(w, torch.float32), t(sid, torch.long),
                      len(group), t(gam, torch.float32) if any(x.gamma > 0 for x in group) else None,
                      t(isw, torch.float32) if any(x.token_weights is not None for x in group) else None,
                      t(hin, torch.float32) if any(x.hinted for x in group) else None)
