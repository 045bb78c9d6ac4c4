"""scripts/memory_plan.py counts parameters exactly as transformers builds the model (meta device,
no weights), for every preset and for a local config.json."""
import importlib.util
import json
import os
import sys

import pytest
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("memory_plan", os.path.join(ROOT, "scripts", "memory_plan.py"))
memory_plan = sys.modules["memory_plan"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_plan)


def _config(d: memory_plan.Dims, model_type: str) -> transformers.PretrainedConfig:
    cls = transformers.Qwen2Config if model_type == "qwen2" else transformers.LlamaConfig
    return cls(vocab_size=d.vocab, hidden_size=d.hidden, intermediate_size=d.ffn, num_hidden_layers=d.layers,
               num_attention_heads=d.heads, num_key_value_heads=d.kv_heads, head_dim=d.head_dim,
               tie_word_embeddings=d.tied)


@pytest.mark.parametrize("name", sorted(memory_plan.PRESETS))
def test_preset_parameter_count_matches_transformers(name):
    d = memory_plan.PRESETS[name]
    cfg = _config(d, "qwen2" if d.qkv_bias else "llama")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert d.params() == sum(p.numel() for p in model.parameters())


def test_from_config_file_and_fit_verdict(tmp_path, capsys):
    cfg = _config(memory_plan.PRESETS["qwen2.5-7b"], "qwen2").to_dict()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert memory_plan.Dims.from_config(cfg) == memory_plan.PRESETS["qwen2.5-7b"]
    assert memory_plan.main(["--config", str(path)]) == 0  # 8 x 80 GB: fits
    assert "fits" in capsys.readouterr().out
    assert memory_plan.main(["--config", str(path), "--gpus", "1"]) == 1  # 16 B/param on one GPU: does not
    assert "DOES NOT FIT" in capsys.readouterr().out
