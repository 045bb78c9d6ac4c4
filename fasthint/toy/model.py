"""The embedded default policy: a character tokenizer, a tiny Qwen2 and its supervised warm start.

Everything is built in-process and saved as an ordinary Hugging Face checkpoint directory (config,
safetensors weights, tokenizer with a chat template), so the trainer loads it with the same code
as a real model. The warm start teaches three behaviours on the toy task:
solving a question step by step, solving it with a hint in the prompt, and compressing a reference
solution into hints of three strengths as JSON (what SAGE's self-hinting asks of the policy).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import random
import shutil
import time
from typing import Optional

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

from fasthint.data import render_chat
from fasthint.hints import hint_request, hinted_question
from fasthint.toy.task import iter_problems

log = logging.getLogger("fasthint")

TOY_VERSION = 4  # 4: the hint-writing examples use the hint request's own chat (system prompt)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MODEL_KW = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True)


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes 0..255 (GPT-2's mapping)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def build_tokenizer():
    """A byte-level tokenizer without merges (one token per byte) and a Qwen-style chat template.

    It is exactly what transformers rebuilds for a ``qwen2`` checkpoint (``Qwen2Tokenizer``: NFC,
    Qwen's split regex, byte-level mapping, BPE vocabulary), so the in-process tokenizer and the one
    loaded back with ``AutoTokenizer`` give the same ids.
    """
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in _byte_chars():
        vocab[ch] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", model_max_length=MODEL_KW["max_position_embeddings"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tokenizer, seed: int):
    """A randomly initialised tiny Qwen2 (~0.9M parameters)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, **MODEL_KW)
    return Qwen2ForCausalLM(cfg)


def _sft_example(row: dict, rng: random.Random, tokenizer) -> tuple[list[int], list[int]]:
    """(input ids, loss mask) of one chat turn: plain (80%), hinted (15%) or hint writing (5%)."""
    u = rng.random()
    if u < 0.80:
        chat, target = [{"role": "user", "content": row["question"]}], row["solution"]
    elif u < 0.95:
        level = rng.choice(["level_1", "level_2", "level_3"])
        chat = [{"role": "user", "content": hinted_question(row["question"], row["_hints"][level])}]
        target = row["solution"]
    else:
        chat, target = hint_request(row["question"], row["solution"]), json.dumps(row["_hints"])
    p_ids = render_chat(tokenizer, chat)
    t_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return list(p_ids) + t_ids, [0] * len(p_ids) + [1] * len(t_ids)


def _length_buckets(batch: list, max_padded: int) -> list[list]:
    """Splits examples, sorted by length, into micro-batches of at most ``max_padded`` padded tokens."""
    out, cur = [], []
    for ex in sorted(batch, key=lambda e: len(e[0])):
        if cur and (len(cur) + 1) * len(ex[0]) > max_padded:
            out.append(cur)
            cur = []
        cur.append(ex)
    return out + ([cur] if cur else [])


def _sft_loss(model, batch: list, pad_id: int, denom: float) -> float:
    """Backward of the target-token cross-entropy of one right-padded micro-batch, summed / denom."""
    L = max(len(ids) for ids, _ in batch)
    x = torch.full((len(batch), L), pad_id)
    m = torch.zeros((len(batch), L))
    for i, (ids, mask) in enumerate(batch):
        x[i, : len(ids)] = torch.tensor(ids)
        m[i, : len(ids)] = torch.tensor(mask, dtype=torch.float)
    device = next(model.parameters()).device
    x, m = x.to(device), m.to(device)
    logits = model(input_ids=x).logits[:, :-1].float()  # right padding: no mask needed (causal)
    tok_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
    loss = (tok_loss * m[:, 1:]).sum() / denom
    loss.backward()
    return loss.item()


def warm_start(model, tokenizer, seed: int, steps: int, tokens_per_step: int = 1024, lr: float = 3e-3) -> float:
    """Supervised warm start on a stream of toy problems; returns the final loss."""
    rng = random.Random(seed + 1)
    stream = iter_problems(seed + 2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / max(1, steps)))))
    model.train()
    loss_ema, t0 = None, time.time()
    for step in range(steps):
        batch, n_tok = [], 0
        while n_tok < tokens_per_step:
            ids, mask = _sft_example(next(stream), rng, tokenizer)
            batch.append((ids, mask))
            n_tok += len(ids)
        opt.zero_grad(set_to_none=True)
        n_target = sum(sum(mask) for _, mask in batch)
        loss = sum(_sft_loss(model, mb, tokenizer.pad_token_id, n_target)
                   for mb in _length_buckets(batch, tokens_per_step // 2))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_ema = loss if loss_ema is None else 0.95 * loss_ema + 0.05 * loss
        if step % 50 == 0 or step == steps - 1:
            log.info("warm start step %d/%d loss %.4f (%.0f s)", step + 1, steps, loss_ema, time.time() - t0)
    model.eval()
    return float(loss_ema or 0.0)


# The seed-0 toy, warm-started for 1000 steps on the recording machine, ships in the package (3.5 MB):
# every machine then starts from the same weights (a rebuild elsewhere rounds differently and drifts).
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warmstart")
SHIPPED_KEY = (0, 1000)  # (seed, warm-start steps); toy.json beside it: how and where it was built, its sha256


def cpu_name() -> str:
    """The CPU's model name and torch's vector ISA (what decides float rounding), e.g. 'AMD EPYC 7B13 / AVX2'."""
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} / {torch.backends.cpu.get_cpu_capability()}"


def build_record(seed: int, warmstart_steps: int, weights: str) -> dict:
    """What toy.json records of a built toy: its key, the machine and versions, the weights' sha256."""
    with open(weights, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    return {"toy_version": TOY_VERSION, "seed": seed, "warmstart_steps": warmstart_steps, "torch": torch.__version__,
            "cpu": cpu_name(), "threads": torch.get_num_threads(), "sha256": digest}


def shipped_toy() -> Optional[str]:
    """The shipped toy's directory, or None when it is absent or of another toy version."""
    try:
        with open(os.path.join(SHIPPED_DIR, "toy.json")) as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    ok = meta.get("toy_version") == TOY_VERSION and os.path.isfile(os.path.join(SHIPPED_DIR, "model.safetensors"))
    return SHIPPED_DIR if ok else None


def ensure_toy_model(cache_dir: str, seed: int, warmstart_steps: int, rebuild: bool = False) -> str:
    """The toy checkpoint's directory: the shipped one for seed 0 with 1000 warm-start steps (unless
    ``rebuild``); otherwise built, warm-started and cached once."""
    if not rebuild and (seed, warmstart_steps) == SHIPPED_KEY and shipped_toy():
        return SHIPPED_DIR
    root = os.path.join(os.path.expanduser(cache_dir), "toy")
    path = os.path.join(root, f"model-v{TOY_VERSION}-seed{seed}-ws{warmstart_steps}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    log.info("building the toy model (cached in %s; %d warm-start steps)", path, warmstart_steps)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed)
    if warmstart_steps:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        warm_start(model.to(device), tokenizer, seed, warmstart_steps)
        model.cpu()
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "toy.json"), "w") as fh:
        json.dump(build_record(seed, warmstart_steps, os.path.join(tmp, "model.safetensors")), fh, indent=1)
    os.makedirs(root, exist_ok=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return path
