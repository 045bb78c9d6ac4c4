"""How ``fasthint.dist.init`` joins the process group (issue 28: on CUDA an NCCL-only group took no CPU
tensor, so the first step's metric reductions failed; the 10-minute default timeout was shorter than
a 7B run's rank-0 phases). A CPU cannot run NCCL: the call is recorded instead, as a CUDA rank makes it."""
import datetime

import torch

from fasthint import dist as fdist


def _record(monkeypatch, cuda: bool) -> dict:
    seen: dict = {}
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.setdefault("set_device", i))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(fdist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(fdist.dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    return seen


def test_a_cuda_rank_gets_a_backend_per_device_its_gpu_and_the_timeout(monkeypatch):
    seen = _record(monkeypatch, cuda=True)
    assert fdist.init(90) == torch.device("cuda", 3)
    assert seen == {"set_device": 3, "backend": "cpu:gloo,cuda:nccl", "device_id": torch.device("cuda", 3),
                    "timeout": datetime.timedelta(minutes=90)}


def test_a_cpu_rank_gets_gloo_and_the_timeout(monkeypatch):
    seen = _record(monkeypatch, cuda=False)
    assert fdist.init() == torch.device("cpu")
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(minutes=60)}


def test_one_process_joins_no_group(monkeypatch):
    seen = _record(monkeypatch, cuda=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert fdist.init() == torch.device("cpu") and seen == {}
