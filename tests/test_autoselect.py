"""impl="auto" on CUDA measures Triton against the torch path once per head shape and falls back to
torch when Triton fails or is wrong. The selector is device-agnostic, so it runs here on CPU tensors
with the interpreted kernels and a small probe."""
import logging

import pytest
import torch

import fasthint_kernels.logprobs as tl_logprobs
from fasthint import autoselect, ops

OPS = dict(linear_logprobs=ops.linear_logprobs, fused_linear_loss=ops.fused_linear_loss)


@pytest.fixture
def small_probe(monkeypatch):
    monkeypatch.setattr(autoselect, "PROBE_TOKENS", 64)
    monkeypatch.setattr(autoselect, "PROBE_VOCAB", 512)
    monkeypatch.setattr(autoselect, "_DECISIONS", {})


def _head(v=700, d=32):
    return torch.randn(8, d), torch.randn(v, d)


@pytest.mark.parametrize("op", ["logprobs", "policy_loss"])
def test_probe_measures_both_and_caches(small_probe, op, caplog):
    h, w = _head()
    with caplog.at_level(logging.INFO, logger="fasthint"):
        first = autoselect.choose_cuda_impl(op, h, w, 0.7, True, **OPS)
    assert first in ("triton", "torch")
    assert "triton" in caplog.text and "torch" in caplog.text and "ms" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fasthint"):
        assert autoselect.choose_cuda_impl(op, h, w, 0.7, True, **OPS) == first  # cached: no second probe
    assert caplog.text == ""


def test_triton_error_falls_back_to_torch_with_one_warning(small_probe, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("PTX compilation failed")

    monkeypatch.setattr(tl_logprobs, "linear_logprobs_triton", broken)
    h, w = _head()
    with caplog.at_level(logging.WARNING, logger="fasthint"):
        assert autoselect.choose_cuda_impl("logprobs", h, w, 1.0, False, **OPS) == "torch"
    assert "PTX compilation failed" in caplog.text and caplog.text.count("WARNING") == 1


def test_wrong_triton_numbers_fall_back_to_torch(small_probe, monkeypatch, caplog):
    real = tl_logprobs.linear_logprobs_triton

    def off_by_a_bit(*a, **k):
        out = real(*a, **k)
        return out + 0.05 if isinstance(out, torch.Tensor) else (out[0] + 0.05, out[1])

    monkeypatch.setattr(tl_logprobs, "linear_logprobs_triton", off_by_a_bit)
    h, w = _head()
    with caplog.at_level(logging.WARNING, logger="fasthint"):
        assert autoselect.choose_cuda_impl("logprobs", h, w, 1.0, False, **OPS) == "torch"
    assert "disagree" in caplog.text


def test_policy_loss_probe_checks_and_times_the_epilogue_kernel(small_probe, monkeypatch, caplog):
    """The policy-loss probe runs the kernel that training runs (objective in the epilogue), with the
    soft-cap; a wrong result there sends training to torch."""
    import fasthint_kernels.fused_pg as fused_pg

    calls = []
    real = fused_pg.fused_pg_loss

    def counted(*a, **k):
        calls.append(k.get("softcap"))
        return real(*a, **k)

    monkeypatch.setattr(fused_pg, "fused_pg_loss", counted)
    h, w = _head()
    assert autoselect.choose_cuda_impl("policy_loss", h, w, 0.7, True, softcap=5.0, **OPS) in ("triton", "torch")
    assert calls and set(calls) == {5.0}

    def wrong(*a, **k):
        loss, lp, ent = real(*a, **k)
        return loss * 1.01, lp, ent

    monkeypatch.setattr(fused_pg, "fused_pg_loss", wrong)
    monkeypatch.setattr(autoselect, "_DECISIONS", {})
    with caplog.at_level(logging.WARNING, logger="fasthint"):
        assert autoselect.choose_cuda_impl("policy_loss", h, w, 0.7, True, **OPS) == "torch"
    assert "disagree" in caplog.text


def test_fp32_heads_under_exact_matmuls_take_the_torch_path():
    """fp32 heads on CUDA under torch's default full-fp32 matmuls skip the probe and use torch (the
    Triton kernels' exact fp32 dots run on FMA units and spill, issue 29); with TF32 allowed they are
    probed like bf16 heads. The rule reads torch's own settings."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert torch.get_float32_matmul_precision() == "highest"
        assert autoselect.fp32_exact_head(torch.float32) and not autoselect.fp32_exact_head(torch.bfloat16)
        matmul.allow_tf32 = True
        assert not autoselect.fp32_exact_head(torch.float32)
    finally:
        matmul.allow_tf32 = before
