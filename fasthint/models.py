"""Loading the policy (and the optional frozen reference) as Hugging Face checkpoints."""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fasthint import dist
from fasthint.data import render_prompt
from fasthint.errors import ModelError
from fasthint.head import head_transform
from fasthint.loss import PolicyLoss
from fasthint.options import Options, option
from fasthint.packing import packed_attention_implementation
from fasthint.toy.model import ensure_toy_model

log = logging.getLogger("fasthint")


@dataclass
class ModelConfig(Options):
    """The policy model."""

    GROUP = "model"
    model: str = option("toy", "HF checkpoint directory (or hub id where the hub is reachable); "
                               "'toy' builds and warm-starts the embedded tiny Qwen2 model (cached).")
    attn_implementation: str = option("auto", "attention kernel of the trainer's model: auto = flash_attention_2 "
                                              "when flash-attn is importable on CUDA, else sdpa; or any value "
                                              "transformers accepts.")
    bf16: Optional[bool] = option(None, "bfloat16 compute with fp32 master weights: under torchrun FSDP2's "
                                        "MixedPrecisionPolicy (bf16 parameters for forward/backward and for the "
                                        "rollout gathers, fp32 gradient reduction, sharded fp32 weights and AdamW "
                                        "states); in one process bf16 autocast. Unset = on where CUDA has bf16, "
                                        "off on CPU.")
    gradient_checkpointing: bool = option(False, "recompute each decoder layer's activations in the backward "
                                                 "pass (non-reentrant): the policy update keeps one layer's "
                                                 "activations instead of all, for about a third more compute.")

    def check(self) -> None:
        if self.bf16 is None:  # resolved once, so train_config.json records what ran
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_model_path(model: str, cache_dir: str, seed: int, warmstart_steps: int, rebuild: bool = False) -> str:
    """'toy' becomes the warm-started toy checkpoint (the shipped one, or built and cached for another
    ``seed``/``warmstart_steps`` or with ``rebuild``); other values are returned as given."""
    if model == "toy":
        return ensure_toy_model(cache_dir, seed, warmstart_steps, rebuild=rebuild)
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        raise ModelError(f"model path {model!r} is not a Hugging Face checkpoint (no config.json): "
                         "pass a directory written by save_pretrained, or --model toy")
    if not os.path.exists(model) and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise ModelError(f"model path {model!r} does not exist: pass a checkpoint directory, a hub id "
                         "such as Qwen/Qwen2.5-Math-1.5B, or --model toy")
    return model


def load_model_config(path: str):
    """The model's ``AutoConfig`` (no weights read), or ModelError naming the fix."""
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot read the config of model {path!r} ({first[:200]}): pass a local checkpoint "
                         "directory with config.json, weights and tokenizer files") from None


def _causal_lm_class(config):
    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ModelError(f"model type {config.model_type!r} is not a causal LM known to transformers: "
                         "pass a decoder-only checkpoint (Qwen2/3, Llama, Mistral, Gemma-2, Phi-3, ...)") from None


def resolve_attn_implementation(value: str, device: torch.device, config=None) -> str:
    """``auto``: flash-attn's kernels when the package imports, the model runs on CUDA and its class
    supports them; else sdpa where the class supports it; else eager (e.g. Gemma-2, whose attention
    soft-capping sdpa cannot apply). Any other value is checked against ``config``'s class."""
    cls = _causal_lm_class(config) if config is not None else None
    if value == "auto":
        if device.type == "cuda" and importlib.util.find_spec("flash_attn") and \
                (cls is None or getattr(cls, "_supports_flash_attn", False)):
            return "flash_attention_2"
        return "sdpa" if cls is None or getattr(cls, "_supports_sdpa", False) else "eager"
    if cls is not None:
        check_attn_implementation(config, value)
    return value


def trainer_attention(attn: str, padding_free: bool) -> str:
    """The attention the trainer's model loads with: ``attn``, or its packing variant with
    ``--padding_free`` (``fasthint.packing``); a model that cannot pack gets a ModelError."""
    if not padding_free:
        return attn
    try:
        return packed_attention_implementation(attn)
    except ValueError:
        raise ModelError(f"--padding_free needs flash-attn or sdpa attention, and this model runs {attn}: "
                         "pass --padding_free false (or install flash-attn on CUDA)") from None


def check_attn_implementation(config, attn: str) -> None:
    """Builds the architecture on the meta device (no memory, no weights) with ``attn``; a model that
    cannot run it gets a ModelError naming ``--attn_implementation``."""
    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    except (ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ModelError(f"{config.model_type} cannot use --attn_implementation {attn} ({first}): pass "
                         "--attn_implementation auto (picks one the model supports), sdpa or eager") from None


def load_policy(path: str, device: torch.device, attn_implementation: str = "auto", meta: bool = False,
                dtype: torch.dtype = torch.float32):
    """(model in ``dtype`` on ``device``, tokenizer) from a checkpoint directory or hub id; float32 for
    the trainable master weights. ``meta``: the architecture only, on the meta device, no weights read
    (filled later by :func:`fasthint.dist.shard_from_rank0`). ``auto`` attention: what
    :func:`resolve_attn_implementation` picks for this model."""
    if attn_implementation == "auto":
        attn_implementation = resolve_attn_implementation("auto", device, load_model_config(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if meta:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32,
                                                         attn_implementation=attn_implementation)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {path!r} ({first[:200]}): pass a local checkpoint "
                         "directory with config.json, weights and tokenizer files") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return (model if meta else model.to(device)), tokenizer


def check_head(model, tokenizer) -> Optional[str]:
    """The fused loss computes the logits as ``head_transform(config)`` applied to lm_head(last hidden
    state): None when that is what the model computes, else why not. (A soft-cap is invisible while
    the logits are small, as at initialisation: the config is read first, by ``head_transform``.)"""
    transform = head_transform(model.config)
    ids = torch.tensor([render_prompt(tokenizer, "1+1=?")[:32]], device=next(model.parameters()).device)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        ref = transform.apply(model.get_output_embeddings()(out.hidden_states[-1]).float())
    if not torch.allclose(out.logits.float(), ref, atol=1e-3, rtol=1e-3):
        return (f"{model.config.model_type}: this model's logits are not what its config says "
                "(lm_head(last hidden state), scaled or soft-capped): it is not supported by the fused loss yet")
    return None


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers' own), and no KV
    cache in training forwards (it cannot be checkpointed; generation asks for its cache itself)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 (the older name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def checkpoints_activations(model) -> bool:
    """Whether ``model`` recomputes its layers' activations in backward (either transformers name)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def load_trainable_policy(path: str, device: torch.device, attn_implementation: str = "auto",
                          gradient_checkpointing: bool = False, bf16: bool = False):
    """(``fasthint.loss.PolicyLoss`` around the model, tokenizer), checked with :func:`check_head`;
    with ``gradient_checkpointing``, :func:`enable_gradient_checkpointing` before wrapping (and sharding);
    ``bf16``: FSDP2 mixed precision when sharded (one process: the loss autocasts, ``fasthint.update``).

    One process: the model is loaded on ``device``. Under torchrun no rank but 0 ever holds the
    full weights: rank 0 reads the checkpoint on CPU, every rank builds the model on the meta device
    and shards it (FSDP2), and the shards are filled from rank 0 (:func:`dist.shard_from_rank0`).
    """
    if dist.world_size() == 1:
        model, tokenizer = load_policy(path, device, attn_implementation)
        err = check_head(model, tokenizer)
        if err:
            raise ModelError(err)
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return PolicyLoss(model), tokenizer
    full = None
    if dist.rank() == 0:  # the CPU copy only carries weights and runs check_head: CPU attention (flash-attn
        full, tok = load_policy(path, torch.device("cpu"), "auto")  # refuses CPU tensors), sdpa or eager
    err = dist.broadcast(check_head(full, tok) if full is not None else None)
    if err:
        raise ModelError(err)
    model, tokenizer = load_policy(path, device, attn_implementation, meta=True)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    policy = PolicyLoss(model)
    dist.shard_from_rank0(policy, full, device, bf16=bf16)
    return policy, tokenizer
