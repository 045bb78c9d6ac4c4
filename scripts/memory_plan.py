"""Memory plan: bytes per GPU of a fasthint run on paper, per phase, and whether it fits.

    python scripts/memory_plan.py                                   # Qwen2.5-7B, G=8, 64 prompts, 4k, 8x80 GB
    python scripts/memory_plan.py --model llama-3.1-8b --gpus 8 --completion 8192
    python scripts/memory_plan.py --config path/to/config.json --gpus 4 --no-gradient_checkpointing

The model is a decoder of the Qwen2/Llama family given by a preset or a local ``config.json`` (no
download). What is counted (``P`` parameters, ``n`` GPUs, ``c`` the compute dtype's bytes: 2 with
``--bf16``, 4 without):

* **States** (FSDP2, every phase): fp32 sharded weights, gradients and AdamW's two moments,
  ``16 P / n``. ``--kl`` adds the reference model, loaded whole in bf16 on every rank (``2 P``).
* **Training** (one micro-batch of ``--micro_batch_tokens`` tokens): the root module (embeddings,
  head, final norm) gathered in ``c`` and its unsharded gradient (``c``) plus the fused head's fp32
  ``dW`` workspace; two decoder layers gathered (FSDP2 prefetches one) and one layer's gradients
  in ``c`` plus their fp32 reduce-scatter copy; activations: without gradient checkpointing every
  layer keeps ``18 d + 8 f + 8 kv`` bytes per token in bf16 (``34 d + 16 f + 12 kv`` in fp32: the
  RMSNorms' fp32 inputs and outputs, q before and after RoPE, k, v, the attention output, the MLP's
  gate, SiLU, up and product), with it one ``c d`` per layer plus one layer's full set being
  recomputed; the head keeps the hidden states and an fp32 ``dH``.
* **Rollouts, HF engine**: ``fasthint.dist.gathered`` unshards the whole policy in ``c`` on every
  rank, plus the KV cache of one generate call (this rank's sequences, at most
  ``--generation_batch_size``; ``2 kv`` per token per layer, in ``c``).
* **Rollouts, vLLM colocated**: the engine's bf16 weights and the KV cache the rank's sequences need
  (vLLM reserves ``--vllm_gpu_memory_utilization`` of the GPU up front; this counts what it uses);
  the policy is not gathered for vLLM rollouts. The engine keeps both through training too, unless
  ``--sleep_mode`` (``--vllm_sleep_mode``: freed during the update).

Not counted: CUDA context and NCCL buffers (~1-2 GB, in ``--reserve_gb``), allocator fragmentation
(the 10% margin of "fits"), optimiser offload (fasthint has none). The activation formula is checked
against ``bench/memory.py``'s measurement of a 100M model in docs/MEMORY.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Dims:
    """A Qwen2/Llama decoder's shape."""

    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "Dims":
        heads = cfg["num_attention_heads"]
        return cls(vocab=cfg["vocab_size"], hidden=cfg["hidden_size"], ffn=cfg["intermediate_size"],
                   layers=cfg["num_hidden_layers"], heads=heads, kv_heads=cfg.get("num_key_value_heads", heads),
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   tied=bool(cfg.get("tie_word_embeddings", False)),
                   qkv_bias=cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False)))

    def layer_params(self) -> int:
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + ((q + 2 * kv) if self.qkv_bias else 0)
        return attn + 3 * d * self.ffn + 2 * d

    def root_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()

    def act_bytes_per_token_layer(self, c: int) -> int:
        """Activations one decoder layer keeps for backward per token (see the module docstring)."""
        d, f, kv = self.hidden, self.ffn, self.kv_heads * self.head_dim
        return 18 * d + 8 * f + 8 * kv if c == 2 else 34 * d + 16 * f + 12 * kv


PRESETS = {  # from the models' config.json files
    "qwen2.5-1.5b": Dims(151936, 1536, 8960, 28, 12, 2, 128, True, True),
    "qwen2.5-7b": Dims(152064, 3584, 18944, 28, 28, 4, 128, False, True),
    "llama-3.1-8b": Dims(128256, 4096, 14336, 32, 32, 8, 128, False, False),
    "100m": Dims(151936, 512, 1536, 8, 8, 2, 64, True, True),  # bench/memory.py's preset
}


def plan(m: Dims, gpus: int, prompts: int, group: int, prompt_len: int, completion: int,
         micro_batch_tokens: int, bf16: bool, gc: bool, engine: str, kl: bool,
         generation_batch_size: int = 256, sleep_mode: bool = False) -> dict[str, dict[str, float]]:
    """Bytes per GPU by phase and component (worst case: every completion at full length)."""
    c = 2 if bf16 else 4
    P, L, d = m.params(), m.layer_params(), m.hidden
    states = {"weights fp32 (sharded)": 4 * P / gpus, "gradients fp32 (sharded)": 4 * P / gpus,
              "AdamW moments fp32 (sharded)": 8 * P / gpus}
    if kl:
        states["reference model bf16 (whole)"] = 2 * P
    T = micro_batch_tokens
    per_layer = m.act_bytes_per_token_layer(c)
    acts = T * (m.layers * c * d + per_layer) if gc else T * m.layers * per_layer
    train = {
        "root gathered + its gradient": 2 * c * m.root_params(),
        "head dW fp32 workspace": 4 * m.vocab * d,
        "2 layers gathered, 1 layer's gradients": 2 * c * L + (c + 4) * L,
        "activations" + (" (checkpointed)" if gc else ""): acts,
        "head hidden + fp32 dH": T * d * (c + 4),
    }
    seqs = prompts * group / gpus
    if engine == "hf":  # one generate call holds at most generation_batch_size sequences
        seqs = min(seqs, generation_batch_size)
    kv_cache = seqs * (prompt_len + completion) * m.layers * 2 * m.kv_heads * m.head_dim * c
    if engine == "vllm":
        roll = {"vLLM weights bf16": 2 * P, "KV cache (this rank's sequences, bf16)": kv_cache / c * 2}
        if not sleep_mode:  # the engine holds its memory through the update too
            train.update({f"{k} (vLLM, awake)": v for k, v in roll.items()})
    else:
        roll = {f"policy gathered ({'bf16' if bf16 else 'fp32'})": c * P, "KV cache": kv_cache}
    return {"states": states, "training": train, "rollouts": roll}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-7b", choices=sorted(PRESETS))
    p.add_argument("--config", help="a local config.json (overrides --model)")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu_gb", type=float, default=80.0)
    p.add_argument("--prompts", type=int, default=64, help="prompts per rollout batch (all GPUs)")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--completion", type=int, default=4096)
    p.add_argument("--micro_batch_tokens", type=int, default=16384)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    p.add_argument("--generation_batch_size", type=int, default=256, help="hf engine: sequences per generate call")
    p.add_argument("--sleep_mode", action="store_true", help="vllm: --vllm_sleep_mode (freed during the update)")
    p.add_argument("--kl", action="store_true", help="beta > 0: a reference model is loaded")
    p.add_argument("--reserve_gb", type=float, default=2.0, help="CUDA context, NCCL buffers")
    a = p.parse_args(argv)
    if a.config:
        with open(a.config) as fh:
            m, name = Dims.from_config(json.load(fh)), a.config
    else:
        m, name = PRESETS[a.model], a.model
    parts = plan(m, a.gpus, a.prompts, a.group, a.prompt_len, a.completion, a.micro_batch_tokens, a.bf16,
                 a.gradient_checkpointing, a.engine, a.kl, a.generation_batch_size,
                 a.sleep_mode)
    print(f"{name}: {m.params() / 1e9:.2f}B parameters; {a.gpus} x {a.gpu_gb:g} GB; {a.prompts} prompts x "
          f"G={a.group}, prompt {a.prompt_len} + completion {a.completion} tokens; micro-batch "
          f"{a.micro_batch_tokens} tokens; bf16 {a.bf16}; gradient checkpointing {a.gradient_checkpointing}; "
          f"engine {a.engine}")
    states = sum(parts["states"].values())
    for phase, comps in parts.items():
        print(f"  {phase}")
        for k, v in comps.items():
            print(f"    {k:42s} {v / GB:8.2f} GB")
    peaks = {ph: states + (sum(parts[ph].values()) if ph != "states" else 0) + a.reserve_gb * GB
             for ph in ("training", "rollouts")}
    budget = 0.9 * a.gpu_gb * GB
    for ph, v in peaks.items():
        print(f"  peak {ph:9s} (states + {ph} + {a.reserve_gb:g} GB reserve) {v / GB:8.2f} GB   "
              f"{'fits' if v <= budget else 'DOES NOT FIT'} in 90% of {a.gpu_gb:g} GB")
    return 0 if max(peaks.values()) <= budget else 1


if __name__ == "__main__":
    sys.exit(main())
