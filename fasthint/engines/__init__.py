"""Rollout engines: generate G completions per prompt with their sampling log-probs.

``hf`` (``engines/hf.py``) samples from the trainer's own module; ``vllm`` (``engines/vllm.py``) is an
in-process vLLM engine fed the trainer's weights after every step.
"""
from typing import Optional

from fasthint.engines.base import Completion, RolloutEngine, SamplingConfig

__all__ = ["Completion", "RolloutEngine", "SamplingConfig", "make_engine"]


def make_engine(kind: str, model, tokenizer, model_path: Optional[str], cfg):
    """The rollout engine named by ``--engine`` (``hf`` or ``vllm``)."""
    if kind == "vllm":
        from fasthint.engines.vllm import VLLMEngine

        engine = VLLMEngine(model_path, tokenizer, seed=cfg.seed,
                            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                            max_model_len=cfg.max_prompt_length + max(cfg.max_new_tokens, cfg.hint_max_new_tokens),
                            sleep_mode=cfg.vllm_sleep_mode)
        engine.update_weights(model)  # the trainer's weights, whatever the directory it started from
        return engine
    from fasthint.engines.hf import HFEngine

    return HFEngine(model, tokenizer, batch_size=cfg.generation_batch_size)
