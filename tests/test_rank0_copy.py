"""Under torchrun rank 0 reads the full checkpoint on CPU and runs check_head there (issue 28): that
copy must load with an attention that runs on CPU (sdpa or eager), whatever the trainer's GPU model
uses (flash-attn refuses CPU tensors before training starts). The ranks' sharded model keeps the
run's attention. Two ranks are simulated: rank 0 of a world of 2, with the collectives recorded."""
import torch

import fasthint.models as models
from conftest import save_toy_checkpoint


def test_rank0s_cpu_copy_loads_with_cpu_attention(tmp_path, monkeypatch):
    path = save_toy_checkpoint(str(tmp_path / "toy"))
    loads, real_load = [], models.load_policy

    def recording_load(p, device, attn="auto", meta=False, **kw):
        model, tok = real_load(p, device, "auto" if attn == "flash_attention_2" else attn, meta=meta, **kw)
        loads.append((device.type, meta, attn, model.config._attn_implementation))
        return model, tok

    monkeypatch.setattr(models, "load_policy", recording_load)
    monkeypatch.setattr(models.dist, "world_size", lambda: 2)
    monkeypatch.setattr(models.dist, "rank", lambda: 0)
    monkeypatch.setattr(models.dist, "broadcast", lambda obj: obj)
    monkeypatch.setattr(models.dist, "shard_from_rank0", lambda policy, full, device, bf16=False: None)
    models.load_trainable_policy(path, torch.device("cpu"), attn_implementation="flash_attention_2")
    cpu_copy, sharded = loads
    assert cpu_copy[:2] == ("cpu", False) and cpu_copy[2] != "flash_attention_2"
    assert cpu_copy[3] in ("sdpa", "eager")
    assert sharded[1] is True and sharded[2] == "flash_attention_2"  # the run's attention for the shards
