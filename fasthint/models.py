"""Loading the policy (and the optional frozen reference) as Hugging Face checkpoints."""
from __future__ import annotations

import logging
import os

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


def load_policy(path: str, device: torch.device, attn_implementation: str = "sdpa"):
    """(model in float32 on ``device``, tokenizer) from a checkpoint directory or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation=attn_implementation)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {path!r} ({first[:200]}): pass a local checkpoint "
                         "directory with config.json, weights and tokenizer files") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer
