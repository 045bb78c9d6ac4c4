"""Rollout engines: generate G completions per prompt with their sampling log-probs.

``hf`` (``engines/hf.py``) samples from the trainer's own module; ``vllm`` (``engines/vllm.py``) is an
in-process vLLM engine fed the trainer's weights after every step.
"""
from typing import Optional

from fasthint.engines.base import Completion, RolloutConfig, RolloutEngine, SamplingConfig
from fasthint.engines.hf import HFEngine

__all__ = ["Completion", "RolloutConfig", "RolloutEngine", "SamplingConfig", "make_engine"]


def make_engine(cfg: RolloutConfig, model, tokenizer, model_path: Optional[str], *, seed: int,
                max_model_len: int) -> RolloutEngine:
    """The rollout engine ``cfg.engine`` (``hf`` or ``vllm``) for ``model``. ``max_model_len``: the
    longest prompt plus the longest generation the engine will be asked for (vLLM sizes its cache)."""
    if cfg.engine == "vllm":
        from fasthint.engines.vllm import VLLMEngine  # vllm is optional and heavy: imported when chosen

        engine = VLLMEngine(model_path, tokenizer, seed=seed, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                            max_model_len=max_model_len, sleep_mode=cfg.vllm_sleep_mode)
        engine.update_weights(model)  # the trainer's weights, whatever the directory it started from
        return engine

    return HFEngine(model, tokenizer, batch_size=cfg.generation_batch_size)
