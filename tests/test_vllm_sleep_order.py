"""The vLLM engine's weight sync with sleep mode, on a recording stand-in for vllm.LLM (vLLM's sleep
mode needs CUDA; tests/test_vllm.py runs the real engine without it): the weights are woken before
they are loaded, the prefix cache (keys and values of the old weights) is reset after, and the KV
cache is woken last; every parameter arrives once, cast to the engine's dtype."""
import torch

from fasthint.engines.vllm import VLLMEngine
from fasthint.toy.model import build_model, build_tokenizer


class Recorder:
    def __init__(self):
        self.calls, self.loaded = [], {}

    def wake_up(self, tags):
        self.calls.append(("wake_up", tuple(tags)))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def reload_weights(self, weights_iterator):
        self.calls.append(("reload_weights",))
        for name, t in weights_iterator:
            assert name not in self.loaded
            self.loaded[name] = t


def test_sleep_mode_sync_order_and_dtype(monkeypatch):
    import fasthint.engines.vllm as vllm_engine

    engine = object.__new__(VLLMEngine)  # no real engine: record what the sync asks of it
    rec = Recorder()
    # torch's cache is handed back before each wake (issue 28: the update's freed blocks stay reserved otherwise)
    monkeypatch.setattr(vllm_engine, "free_cached_memory", lambda: rec.calls.append(("free_cached_memory",)))
    engine.llm, engine.sleep_mode, engine.dtype = rec, True, torch.bfloat16
    engine._runner = lambda: rec
    model = build_model(build_tokenizer(), seed=0)
    engine.sleep()
    engine.update_weights(model)
    assert rec.calls == [("sleep", 1), ("free_cached_memory",), ("wake_up", ("weights",)), ("reload_weights",),
                         ("reset_prefix_cache",), ("free_cached_memory",), ("wake_up", ("kv_cache",))]
    want = dict(model.named_parameters(remove_duplicate=False))
    assert rec.loaded.keys() == want.keys()
    assert all(rec.loaded[k].dtype == torch.bfloat16 and torch.equal(rec.loaded[k], p.detach().bfloat16())
               for k, p in want.items())


def test_free_cached_memory_empties_torchs_cache_after_a_collection(monkeypatch):
    import fasthint.engines.vllm as vllm_engine

    calls = []
    monkeypatch.setattr(vllm_engine.gc, "collect", lambda: calls.append("gc"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    vllm_engine.free_cached_memory()
    assert calls == ["gc", "empty_cache"]
