"""Loading the policy (and the optional frozen reference) as Hugging Face checkpoints."""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from fasthint.errors import ModelError

log = logging.getLogger("fasthint")


def resolve_model_path(model: str, cache_dir: str, seed: int, warmstart_steps: int) -> str:
    """'toy' becomes the cached, warm-started toy checkpoint; other values are returned as given."""
    if model == "toy":
        from fasthint.toy.model import ensure_toy_model

        return ensure_toy_model(cache_dir, seed, warmstart_steps)
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        raise ModelError(f"model path {model!r} is not a Hugging Face checkpoint (no config.json): "
                         "pass a directory written by save_pretrained, or --model toy")
    if not os.path.exists(model) and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise ModelError(f"model path {model!r} does not exist: pass a checkpoint directory, a hub id "
                         "such as Qwen/Qwen2.5-Math-1.5B, or --model toy")
    return model


def resolve_attn_implementation(value: str, device: torch.device) -> str:
    """``auto``: flash-attn's kernels when the package imports and the model runs on CUDA, else sdpa."""
    if value != "auto":
        return value
    import importlib.util

    return "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"


def load_policy(path: str, device: torch.device, attn_implementation: str = "sdpa", meta: bool = False):
    """(model in float32 on ``device``, tokenizer) from a checkpoint directory or hub id. ``meta``:
    the architecture only, on the meta device, no weights read (filled later by
    :func:`fasthint.dist.shard_from_rank0`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if meta:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32,
                                                         attn_implementation=attn_implementation)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                         attn_implementation=attn_implementation)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {path!r} ({first[:200]}): pass a local checkpoint "
                         "directory with config.json, weights and tokenizer files") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return (model if meta else model.to(device)), tokenizer


def check_head(model, tokenizer) -> Optional[str]:
    """The fused loss needs logits == lm_head(last hidden state): None, or why this model differs."""
    from fasthint.data import render_prompt

    ids = torch.tensor([render_prompt(tokenizer, "1+1=?")[:32]], device=next(model.parameters()).device)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        ref = model.get_output_embeddings()(out.hidden_states[-1]).float()
    if not torch.allclose(out.logits.float(), ref, atol=1e-3, rtol=1e-3):
        return ("this model's logits are not lm_head(last hidden state) (logit scaling or soft-capping?): "
                "it is not supported by the fused loss yet")
    return None


def load_trainable_policy(path: str, device: torch.device, attn_implementation: str = "sdpa"):
    """(``dist.PolicyLoss`` around the model, tokenizer), checked with :func:`check_head`.

    One process: the model is loaded on ``device``. Under torchrun no rank but 0 ever holds the
    full weights: rank 0 reads the checkpoint on CPU, every rank builds the model on the meta device
    and shards it (FSDP2), and the shards are filled from rank 0 (:func:`dist.shard_from_rank0`).
    """
    from fasthint import dist

    if dist.world_size() == 1:
        model, tokenizer = load_policy(path, device, attn_implementation)
        err = check_head(model, tokenizer)
        if err:
            raise ModelError(err)
        return dist.PolicyLoss(model), tokenizer
    full = None
    if dist.rank() == 0:
        full, tok = load_policy(path, torch.device("cpu"), attn_implementation)
    err = dist.broadcast(check_head(full, tok) if full is not None else None)
    if err:
        raise ModelError(err)
    model, tokenizer = load_policy(path, device, attn_implementation, meta=True)
    policy = dist.PolicyLoss(model)
    dist.shard_from_rank0(policy, full, device)
    return policy, tokenizer
