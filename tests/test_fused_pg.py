"""The policy-gradient loss with its objective in the Triton kernel (fasthint_kernels.fused_pg),
under the interpreter on CPU: loss, log-probs, entropies and the gradients of hidden states, weight
and bias against float64 ground truth with Cut Cross-Entropy's rule |ref64 - fast| <= |ref64 -
torch_fp32| + tol, for every epilogue variant, masked tokens, ragged shapes, temperature != 1, a
random upstream gradient and one real vocabulary size."""
import pytest
import torch

from fasthint_kernels.fused_pg import fused_pg_loss
from fasthint_kernels.reference import pg_loss_torch
from fasthint_kernels.spec import PGSpec


def _case(n, d, v, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.5
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * (1.0 / d ** 0.5)
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.1 if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, b, y, g


def _spec(h, w, b, y, g, temperature, variant):
    with torch.no_grad():  # old log-probs near the current ones, so ratios straddle the clip range
        z = h @ w.T + (b if b is not None else 0)
        lp = torch.log_softmax(z / temperature, -1).gather(-1, y[:, None]).squeeze(-1)
    n = len(y)
    old = lp + 0.4 * torch.randn(n, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, generator=g) > 0.2).double()
    weights = mask / mask.sum()
    kw = dict(old_logp=old, advantages=adv, weights=weights, eps_low=0.2, eps_high=0.28)
    if variant in ("dual", "all"):
        kw["dual_clip"] = 1.5
    if variant in ("shaped", "all"):
        kw["gamma"] = torch.where(torch.rand(n, generator=g) > 0.5, 0.5 + torch.rand(n, generator=g), 0.0).double()
    if variant in ("kl", "all"):
        kw.update(ref_logp=lp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64),
                  beta=1.0 if variant == "kl" else 0.05)  # alone, large enough to dominate the gradient
    if variant in ("entropy", "all"):
        kw["entropy_coef"] = 0.5 if variant == "entropy" else 0.01
    if variant in ("is", "all"):
        kw["is_weights"] = torch.rand(n, generator=g, dtype=torch.float64) * 2
    return PGSpec(**kw)


def _cast(spec, dtype):
    out = PGSpec(**{k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in vars(spec).items()})
    return out


def _run(fn, h, w, b, y, spec, temperature, up, dtype):
    hh = h.detach().to(dtype).clone().requires_grad_()
    ww = w.detach().to(dtype).clone().requires_grad_()
    bb = b.detach().to(dtype).clone().requires_grad_() if b is not None else None
    loss, lp, ent = fn(hh, ww, y, _cast(spec, dtype if dtype == torch.float64 else torch.float32), bias=bb,
                       temperature=temperature)
    (loss * up).backward()
    out = {"loss": loss.detach(), "logp": lp, "ent": ent, "dh": hh.grad, "dw": ww.grad}
    if b is not None:
        out["db"] = bb.grad
    return {k: v.double() for k, v in out.items()}


def _check(h, w, b, y, spec, temperature, tol=1e-5, backward=None):
    up = 0.7  # a random upstream gradient: the loss is scaled before backward
    ref = _run(pg_loss_torch, h, w, b, y, spec, temperature, up, torch.float64)
    same = _run(pg_loss_torch, h, w, b, y, spec, temperature, up, torch.float32)
    fast = _run(lambda *a, **k: fused_pg_loss(*a, **k, impl="triton", backward=backward), h, w, b, y, spec,
                temperature, up, torch.float32)
    for k in ref:
        err, base = (ref[k] - fast[k]).abs(), (ref[k] - same[k]).abs()
        scale = ref[k].abs().max().item() + 1e-12
        assert (err <= base + tol * scale).all(), (k, (err - base).max().item(), scale)
    assert ref["dh"].abs().max() > 1e-4 and ref["dw"].abs().max() > 1e-4  # the gradient is not trivially 0


@pytest.mark.parametrize("backward", ["split", "atomic"])
@pytest.mark.parametrize("variant", ["clip", "dual", "shaped", "kl", "entropy", "is", "all"])
def test_every_epilogue_variant_against_float64(variant, backward):
    h, w, b, y, g = _case(70, 72, 2100, seed=1, bias=True)  # 2 token tiles, 2 D tiles, 3 vocab tiles, ragged
    _check(h, w, b, y, _spec(h, w, b, y, g, 0.7, variant), 0.7, backward=backward)


def test_split_backward_in_several_vocabulary_chunks(monkeypatch):
    """The split backward's chunks (256 columns here: 9 chunks of V = 2100, the last ragged) give the
    same answer; the atomic and split backwards agree to fp32 rounding."""
    import fasthint_kernels.head_backward as hb

    monkeypatch.setattr(hb, "SPLIT_ELEMS", 70 * 256)
    h, w, b, y, g = _case(70, 72, 2100, seed=11, bias=True)
    _check(h, w, b, y, _spec(h, w, b, y, g, 0.7, "all"), 0.7, backward="split")
    with pytest.raises(ValueError, match="backward must be 'split' or 'atomic'"):
        _check(h, w, b, y, _spec(h, w, b, y, g, 0.7, "clip"), 0.7, backward="fast")


@pytest.mark.parametrize("d", [896, 1536, 3584])
def test_model_widths(d):
    h, w, b, y, g = _case(20, d, 300, seed=2)
    _check(h, w, b, y, _spec(h, w, b, y, g, 1.0, "all"), 1.0)


@pytest.mark.slow
def test_real_vocabulary_size():
    h, w, b, y, g = _case(8, 64, 151936, seed=3)  # Qwen2's vocabulary, not a multiple of the tile
    _check(h, w, b, y, _spec(h, w, b, y, g, 1.0, "all"), 1.0)


def test_masked_tokens_give_no_gradient_and_clip_acts():
    h, w, b, y, g = _case(16, 32, 500, seed=4)
    spec = _spec(h, w, b, y, g, 1.0, "clip")
    spec.weights[:8] = 0.0  # the first half trains nothing
    hh = h.float().requires_grad_()
    loss, lp, _ = fused_pg_loss(hh, w.float(), y, _cast(spec, torch.float32), impl="triton")
    loss.backward()
    assert hh.grad[:8].abs().max() == 0 and hh.grad[8:].abs().max() > 0
    r = torch.exp(lp.double() - spec.old_logp)
    assert ((r < 0.8) | (r > 1.28)).any()  # some tokens are clipped: their branch gives no gradient


@pytest.mark.parametrize("terms", ["grpo", "guide_kl_entropy_tis"])
def test_policy_loss_lowered_to_the_kernel_equals_the_closure_path(terms, monkeypatch):
    """fasthint.loss lowers its objective (terms, aggregation, mask, importance weights) to the
    kernel's spec: the Triton path in fp32 agrees with the float64 torch path under the rule above, and
    a custom term is not lowered (the closure path then runs)."""
    from fasthint.loss import ClippedSurrogate, EntropyBonus, KLPenalty, ShapedRatio, Term, fused_policy_loss, \
        make_objective

    h, w, _, y, g = _case(40, 48, 1500, seed=5)
    n = len(y)
    spec = _spec(h, w, None, y, g, 0.8, "all")
    mask = (torch.rand(n, generator=g) > 0.25).float()
    seq = torch.arange(n) // 8
    if terms == "grpo":
        kw = dict(terms=[ClippedSurrogate(0.2, 0.28, 3.0)], loss_agg="token-mean")
    else:
        kw = dict(terms=[ShapedRatio(ClippedSurrogate(0.2, 0.28)), KLPenalty(0.1), EntropyBonus(0.05)],
                  ref_logp=spec.ref_logp, shaped_gamma=spec.gamma, token_fields={"is_weight": spec.is_weights},
                  loss_agg="seq-mean-token-mean", seq_ids=seq)
    from fasthint import ops

    def composed(*a, **k):
        raise AssertionError("the Triton path composed linear_logprobs instead of running the fused kernel")

    monkeypatch.setattr(ops, "linear_logprobs", composed)  # the torch path does not use it either
    outs = {}
    for name, dtype, impl in (("ref", torch.float64, "torch"), ("same", torch.float32, "torch"),
                              ("fast", torch.float32, "triton")):
        hh = h.detach().to(dtype).clone().requires_grad_()
        ww = w.detach().to(dtype).clone().requires_grad_()
        loss, stats = fused_policy_loss(hh, ww, y, spec.advantages, mask, spec.old_logp, temperature=0.8,
                                        return_entropy=True, impl=impl, **kw)
        loss.backward()
        outs[name] = {"loss": loss.detach().double(), "dh": hh.grad.double(), "dw": ww.grad.double(),
                      "clip": stats["clip_ratio/high"].double(), "ent": stats["entropy"].double()}
    for k in outs["ref"]:
        err = (outs["ref"][k] - outs["fast"][k]).abs()
        base = (outs["ref"][k] - outs["same"][k]).abs()
        assert (err <= base + 1e-5 * (outs["ref"][k].abs().max() + 1e-12)).all(), k
    assert outs["ref"]["dh"].abs().max() > 1e-4

    class Custom(Term):
        def loss(self, logp, t):
            return -logp

    obj = make_objective(spec.old_logp.float(), spec.advantages.float(), mask, terms=[Custom()])
    assert obj.lower() is None
    assert make_objective(spec.old_logp.float(), spec.advantages.float(), mask, **{
        k: v for k, v in kw.items() if k not in ("seq_ids", "loss_agg")}).lower() is not None


def test_gradient_filtering_error_within_its_bound():
    """filter_eps skips the dH/dW/db work of vocabulary tiles where every probability is below it
    and no target lies: the change is within sum over skippable (token, column) pairs of |dz| times
    |W| (dH), |H| (dW) or 1 (db), with dz the exact float64 logit gradient; and tiles were skipped."""
    h, w, b, y, g = _case(64, 48, 4200, seed=6, bias=True)
    b[:1024] += 8.0  # the first vocabulary tile holds almost all the probability; targets live there
    y = torch.randint(0, 1024, (64,), generator=g)
    spec = _spec(h, w, b, y, g, 1.0, "all")
    eps = 2.0 ** -12

    def fast(filter_eps):
        hh, ww, bb = (x.detach().float().clone().requires_grad_() for x in (h, w, b))
        loss, _, _ = fused_pg_loss(hh, ww, y, _cast(spec, torch.float32), bias=bb, impl="triton",
                                   filter_eps=filter_eps)
        loss.backward()
        return [x.grad.double() for x in (hh, ww, bb)]

    z = (h @ w.T + b).detach().requires_grad_()  # the exact dz: the loss of logits z through an identity head
    pg_loss_torch(z, torch.eye(z.shape[1], dtype=torch.float64), y, spec)[0].backward()
    p = torch.softmax(z.detach(), -1)
    skippable = (p < eps) & (torch.arange(z.shape[1])[None, :] != y[:, None])
    dz = z.grad.abs() * skippable
    bounds = [dz @ w.abs(), dz.T @ h.abs(), dz.sum(0)]
    exact, filtered = fast(None), fast(eps)
    for name, a, f, bound in zip(("dh", "dw", "db"), exact, filtered, bounds):
        tol = 1e-6 * a.abs().max()  # fp32 atomics in another order
        assert ((a - f).abs() <= bound + tol).all(), name
    assert (exact[1] - filtered[1]).abs().max() > 0  # tiles were skipped: dW rows of those columns kept 0
    assert filtered[1][1024:].abs().max() == 0 and filtered[1][:1024].abs().max() > 0


def test_head_grad_filter_reaches_the_kernel():
    """--head_grad_filter goes from the config through fasthint.loss and ops to the kernel: with a
    large threshold the vocabulary tiles without a target contribute nothing to dW; the loss is unchanged."""
    from fasthint.config import TrainConfig
    from fasthint.errors import ConfigError
    from fasthint.loss import fused_policy_loss

    h, w, _, _, g = _case(32, 16, 3000, seed=7)
    y = torch.randint(0, 1024, (32,), generator=g)  # every target in the first vocabulary tile
    old, adv, mask = torch.full((32,), -8.0), torch.randn(32, generator=g), torch.ones(32)
    out = []
    for flt in (None, 0.5):
        ww = w.float().clone().requires_grad_()
        loss, _ = fused_policy_loss(h.float(), ww, y, adv, mask, old, impl="triton", grad_filter=flt)
        loss.backward()
        out.append((loss.item(), ww.grad))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    assert out[0][1][1024:].abs().max() > 0 and out[1][1][1024:].abs().max() == 0
    assert TrainConfig(head_grad_filter=2 ** -12).validate().head_grad_filter == 2 ** -12
    with pytest.raises(ConfigError, match="--head_grad_filter"):
        TrainConfig(head_grad_filter=1.5).validate()


@pytest.mark.parametrize("cap", [3.0, 30.0])
def test_softcap_against_float64(cap):
    """Gemma-2's final-logit soft-cap c tanh(a / c) inside the kernel (3: saturating; 30: Gemma-2's)."""
    h, w, b, y, g = _case(70, 72, 2100, seed=8, bias=True)
    w = w * 6  # logits of several units, so that a cap of 3 saturates
    spec = _spec(h, w, b, y, g, 0.7, "all")
    up = 0.7
    runs = {}
    for name, dtype, impl in (("ref", torch.float64, "torch"), ("same", torch.float32, "torch"),
                              ("fast", torch.float32, "triton")):
        hh, ww, bb = (x.detach().to(dtype).clone().requires_grad_() for x in (h, w, b))
        loss, lp, ent = fused_pg_loss(hh, ww, y, _cast(spec, torch.float64 if dtype == torch.float64 else dtype),
                                      bias=bb, temperature=0.7, softcap=cap, impl=impl)
        (loss * up).backward()
        runs[name] = [x.double() for x in (loss.detach(), lp, ent, hh.grad, ww.grad, bb.grad)]
    for k, (a, f, s) in enumerate(zip(runs["ref"], runs["fast"], runs["same"])):
        assert ((a - f).abs() <= (a - s).abs() + 1e-5 * (a.abs().max() + 1e-12)).all(), k
    assert (runs["ref"][3] - _run(pg_loss_torch, h, w, b, y, spec, 0.7, up, torch.float64)["dh"]).abs().max() > 1e-6


def test_fp16_inputs_against_float64():
    """fp16 hidden states and head (the interpreter's bf16 dot is wrong; bf16 runs in tests/test_gpu.py):
    the baseline is torch as a mixed-precision trainer runs it, an fp16 matmul upcast to fp32 logits
    (``(h @ W^T).float()``) with fp16 gradients back through the matmul."""
    h, w, b, y, g = _case(70, 72, 2100, seed=9)
    spec = _spec(h, w, b, y, g, 0.7, "all")
    eye = torch.eye(w.shape[0])
    runs = {}
    for name in ("ref", "same", "fast"):
        dtype = torch.float64 if name == "ref" else torch.float16
        hh, ww = (x.detach().half().to(dtype).clone().requires_grad_() for x in (h, w))  # the same fp16 values
        if name == "fast":
            loss, lp, ent = fused_pg_loss(hh, ww, y, _cast(spec, torch.float32), temperature=0.7, impl="triton")
        else:
            z = (hh @ ww.T).to(torch.float64 if name == "ref" else torch.float32)
            loss, lp, ent = pg_loss_torch(z, eye.to(z.dtype), y, _cast(spec, z.dtype), temperature=0.7)
        (loss * 0.7).backward()
        assert hh.grad.dtype == dtype and ww.grad.dtype == dtype
        runs[name] = [x.double() for x in (loss.detach(), lp, ent, hh.grad, ww.grad)]
    for k, (a, f, s) in enumerate(zip(runs["ref"], runs["fast"], runs["same"])):
        # gradients end in fp16: both may round their fp32 sums to neighbouring fp16 values (one ulp apart)
        ulp = 2.0 ** -10 * a.abs() if k >= 3 else 0.0
        excess = ((a - f).abs() - (a - s).abs() - ulp).max().item() / (a.abs().max().item() + 1e-12)
        assert excess <= 1e-5, (k, excess)
    assert runs["ref"][3].abs().max() > 1e-4


@pytest.mark.parametrize("splits", [2, 5])
def test_forward_split_over_the_vocabulary(splits, monkeypatch):
    """The forward sweep split over the vocabulary (as on a GPU when N is small) and merged in the
    epilogue gives the same loss, log-probs, entropies and gradients; with 5 splits of V = 2100 in tiles
    of 1024 two splits are empty and must add nothing."""
    import fasthint_kernels.logprobs as lp

    monkeypatch.setattr(lp, "FWD_SPLITS", splits)
    h, w, b, y, g = _case(70, 72, 2100, seed=12, bias=True)
    _check(h, w, b, y, _spec(h, w, b, y, g, 0.7, "all"), 0.7)
