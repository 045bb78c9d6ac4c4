"""GPU-only checks (skipped without CUDA): bf16 ops on real hardware and a CUDA training run."""
import math

import pytest
import torch

from fasthint import ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_logprobs_cuda_against_float64(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, v, temp = 1000, 256, 32003, 0.7
    h = (torch.randn(n, d, device="cuda", generator=g) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(v, d, device="cuda", generator=g) * 0.05).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    g_lp, g_ent = torch.randn(n, device="cuda", generator=g), torch.randn(n, device="cuda", generator=g)

    def run(hh, ww, impl):
        lp, ent = ops.linear_logprobs(hh, ww, y, temperature=temp, return_entropy=True, impl=impl)
        grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (hh, ww))
        return (lp, ent) + grads

    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    gt = run(h64, w64, "reference")
    fast = run(h, w, "torch")
    same = run(h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(), "reference")
    eps = torch.finfo(dtype).eps  # outputs are rounded to the input dtype (bf16: 2^-7 relative)
    for name, a, b, c in zip(("logp", "entropy", "dh", "dw"), gt, fast, same):
        tol = (1e-5 + eps) * a.abs().max().item()
        err_fast = (a - b.double()).abs()
        err_same = (a - c.double()).abs()
        assert bool((err_fast <= err_same + tol).all()), f"{name}: {err_fast.max()} vs {err_same.max()}"


def test_cuda_training_run(tmp_path):
    import fasthint

    cfg = fasthint.TrainConfig(max_steps=3, output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                               toy_warmstart_steps=20, toy_train_size=100, eval_max_prompts=16,
                               progress_bar=False, prompts_per_step=8, num_generations=4)
    res = fasthint.fit(cfg)
    assert res["last"]["step"] == 3
    diff = res["last"]["sampling/logp_diff/mean"]  # engine fp32 vs trainer bf16 autocast
    assert math.isnan(diff) or diff < 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_linear_logprobs_cuda_against_float64(dtype):
    """The Triton kernels on real hardware (bf16 tensor cores; fp32 on full-fp32 dots, torch's default,
    which ``auto`` routes to the torch path): same rule as the torch path."""
    g = torch.Generator(device="cuda").manual_seed(1)
    n, d, v = 777, 320, 32003
    h = (torch.randn(n, d, device="cuda", generator=g) * 0.5).to(dtype)
    w = (torch.randn(v, d, device="cuda", generator=g) * 0.05).to(dtype)
    b = torch.randn(v, device="cuda", generator=g).to(dtype)
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    g_lp, g_ent = torch.randn(n, device="cuda", generator=g), torch.randn(n, device="cuda", generator=g)

    def run(impl, cast):
        leaves = [x.detach().to(cast).requires_grad_() for x in (h, w, b)]
        lp, ent = ops.linear_logprobs(*leaves[:2], y, bias=leaves[2], temperature=0.7, return_entropy=True,
                                      impl=impl)
        grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), leaves)
        return [lp, ent, *grads]

    gt = run("reference", torch.float64)
    fast = run("triton", dtype)
    same = run("reference", dtype)
    tf32_slack = 0.0  # fp32: full-fp32 dots under torch's default (TF32 off), as the torch path
    for name, a, f, c in zip(("logp", "entropy", "dh", "dw", "db"), gt, fast, same):
        scale = a.abs().max().item()
        tol = (1e-5 + torch.finfo(dtype).eps + tf32_slack) * scale
        err_f, err_c = (a - f.double()).abs(), (a - c.double()).abs()
        assert bool((err_f <= err_c + tol).all()), f"{name}: {err_f.max().item():.3g} vs {err_c.max().item():.3g}"


@pytest.mark.parametrize("backward", ["split", "atomic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_pg_loss_cuda_against_float64(dtype, backward):
    """The policy-gradient kernel with its objective in the epilogue (every part on) on a real GPU,
    bf16 and fp32, at a Qwen2.5-1.5B head width, against float64 with the rule of the CPU tests."""
    from fasthint_kernels.fused_pg import fused_pg_loss
    from fasthint_kernels.reference import pg_loss_torch
    from fasthint_kernels.spec import PGSpec

    g = torch.Generator(device="cuda").manual_seed(0)
    n, d, v, temp = 2048, 1536, 32003, 0.7
    h = (torch.randn(n, d, device="cuda", generator=g) * 0.5).to(dtype)
    w = (torch.randn(v, d, device="cuda", generator=g) / math.sqrt(d)).to(dtype)
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(h.double() @ w.double().T / temp, -1).gather(-1, y[:, None]).squeeze(-1)
    rnd = lambda: torch.randn(n, device="cuda", generator=g, dtype=torch.float64)  # noqa: E731
    mask = (torch.rand(n, device="cuda", generator=g) > 0.2).double()
    spec = dict(old_logp=lp + 0.4 * rnd(), advantages=rnd(), weights=mask / mask.sum(), dual_clip=3.0,
                gamma=torch.where(rnd() > 0, 1.0, 0.0), ref_logp=lp + 0.3 * rnd(), beta=0.1, entropy_coef=0.01,
                is_weights=rnd().abs())

    def run(fn, dt, spec_dt):
        hh, ww = h.detach().to(dt).requires_grad_(), w.detach().to(dt).requires_grad_()
        s = PGSpec(**{k: (x.to(spec_dt) if torch.is_tensor(x) else x) for k, x in spec.items()})
        loss, lp_, ent = fn(hh, ww, y, s, temperature=temp)
        (0.7 * loss).backward()
        return loss.detach(), lp_, ent, hh.grad, ww.grad

    gt = run(pg_loss_torch, torch.float64, torch.float64)
    same = run(pg_loss_torch, dtype, torch.float32)
    fast = run(lambda *a, **k: fused_pg_loss(*a, **k, impl="triton", backward=backward), dtype, torch.float32)
    eps = torch.finfo(dtype).eps
    for name, a, b, c in zip(("loss", "logp", "entropy", "dh", "dw"), gt, fast, same):
        tol = (1e-5 + eps) * a.abs().max().item()
        err_fast, err_same = (a - b.double()).abs(), (a - c.double()).abs()
        assert bool((err_fast <= err_same + tol).all()), f"{name}: {err_fast.max()} vs {err_same.max()}"
