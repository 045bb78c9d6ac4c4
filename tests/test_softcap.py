"""Final-logit soft-capping (Gemma-2: ``logits = c * tanh(logits / c)``) in the head ops.

Ground truth is computed here, independently of ``fasthint_kernels``: float64 materialised logits,
``c * tanh(z / c)``, ``/ T``, ``log_softmax``, gather, ``-sum p log p``, and autograd for the
gradients. The same formula in float32 is the baseline of the tolerance rule
``|gt - fast| <= |gt - torch_same_dtype| + tol`` (elementwise). The logits have magnitudes of several
units, so ``c = 2`` saturates the tanh; ``c = 30`` barely bends it.
"""
from __future__ import annotations

import types

import pytest
import torch

from fasthint import ops
from fasthint.loss import fused_policy_loss
from fasthint_kernels import native
from fasthint_kernels.chunked import linear_logprobs_chunked
from fasthint_kernels.reference import policy_loss_ref

from conftest import chunked_policy_loss as fused_policy_loss_chunked
from conftest import cpu_head_impls, single_thread

N, D, V = 37, 24, 263
TEMP = 0.7
CAPS = (2.0, 30.0)
HEAD_IMPLS = cpu_head_impls()
_single_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def _problem(n=N, d=D, v=V, seed=0, bias=True):
    """float32 head whose logits have a standard deviation of about 4 (so tanh(z / 2) saturates)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) * (4.0 / d ** 0.5)
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    y = torch.randint(0, v, (n,), generator=gen)
    y[0], y[1] = 0, v - 1  # edges of the vocabulary
    g_lp = torch.randn(n, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(n, generator=gen, dtype=torch.float64)
    def f32(t):
        return (None if t is None else t.float())
    return f32(h), f32(w), f32(b), y, g_lp, g_ent


def _leaves(h, w, b, dtype):
    return [t.detach().to(dtype).requires_grad_(True) for t in (h, w) + ((b,) if b is not None else ())]


def _head(h, w, b, y, temperature, cap):
    """Materialised, differentiable: (logp, entropy) of softmax(cap * tanh((h w^T + b) / cap) / T)."""
    z = h @ w.t()
    if b is not None:
        z = z + b
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    logprobs = torch.log_softmax(z / temperature, dim=-1)
    logp = logprobs.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
    return logp, -(logprobs.exp() * logprobs).sum(-1)


def _materialised(h, w, b, y, cap, g_lp, g_ent, dtype):
    """Outputs and gradients (hidden, weight[, bias]) of (logp * g_lp + entropy * g_ent).sum(), in ``dtype``."""
    leaves = _leaves(h, w, b, dtype)
    logp, ent = _head(*leaves[:2], leaves[2] if b is not None else None, y, TEMP, cap)
    grads = torch.autograd.grad((logp * g_lp.to(dtype) + ent * g_ent.to(dtype)).sum(), leaves)
    return [logp.detach(), ent.detach()], list(grads)


def _fast(fn, h, w, b, y, g_lp, g_ent, **kw):
    leaves = _leaves(h, w, b, h.dtype)
    logp, ent = fn(leaves[0], leaves[1], y, bias=leaves[2] if b is not None else None, temperature=TEMP,
                   return_entropy=True, **kw)
    grads = torch.autograd.grad((logp * g_lp.to(logp.dtype) + ent * g_ent.to(ent.dtype)).sum(), leaves)
    return [logp.detach(), ent.detach()], list(grads)


def _within(gt, fast, same, tol, what):
    """|gt - fast| <= |gt - torch_same_dtype| + tol, elementwise (``tol`` a number or a tensor)."""
    gt, fast, same = gt.double(), fast.double(), same.double()
    err, bound = (gt - fast).abs(), (gt - same).abs() + tol
    bad = err > bound
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} elements out of tolerance, "
                                 f"max excess {(err - bound).max().item():.3e}")


# Why these tolerances (they must hold on every CPU: AVX-512, AVX2 and the scalar fallback sum in other
# orders, and a fixed "+1e-6" held on one of them only). A float32 reduction of n terms errs by at most
# LAMBDA * u * sqrt(n) * sum|terms| with probability >= 1 - 2 exp(-LAMBDA^2 / 2) (probabilistic rounding
# error analysis, Higham & Mary 2019), u = 2^-24. A log-prob is z_y / T - lse: each logit, a length-D dot
# product, errs by about sqrt(D) u (|h| |w| + |b|), the log-sum-exp's V-term sum by sqrt(V) u (relative, so
# absolute in log space), the subtraction by u |lse|; together e_i = LAMBDA u (sqrt(V) + sqrt(D) max_v
# (|h_i| |w_v| + |b_v|) / T + |lse_i|), the error of token i's log-prob and entropy and the relative error
# of each of its softmax probabilities, so of each dz_iv (dz: the float64 gradient at the raw logits). The
# soft-cap's factor 1 - tanh^2 adds an absolute u to it (relative: large where the tanh saturates), so
# LAMBDA u |dz_c| (dz_c: the gradient at the capped logits). A gradient then sums n such terms |dz| |x|.
U32, LAMBDA = 2.0 ** -24, 4.0


def _bounds(h, w, b, y, cap, g_lp, g_ent, upstream=None):
    """Elementwise fp32 rounding allowances: logp/entropy, d_hidden, d_weight, d_bias (and, given
    ``upstream`` = dL/dlogp of a loss, the loss's), from the float64 problem."""
    h, w = h.double(), w.double()
    z = (h @ w.t() + (b.double() if b is not None else 0.0)).requires_grad_(True)
    zc = cap * torch.tanh(z / cap) if cap is not None else z
    logprobs = torch.log_softmax(zc / TEMP, dim=-1)
    logp = logprobs.gather(-1, y[:, None]).squeeze(1)
    ent = -(logprobs.exp() * logprobs).sum(-1)
    g = upstream if upstream is not None else g_lp.double()
    dz, dzc = torch.autograd.grad((logp * g + ent * g_ent.double()).sum(), (z, zc) if cap is not None else (z, z))
    n, v = z.shape
    zmag = h.abs() @ w.abs().t() + (b.double().abs() if b is not None else 0.0)  # |h| |w| + |b|: no cancellation
    out = LAMBDA * U32 * (v ** 0.5 + h.shape[1] ** 0.5 * zmag.amax(-1) / TEMP  # e_i
                          + torch.logsumexp(zc.detach() / TEMP, -1).abs())
    dze = dz.abs() * out[:, None] + (LAMBDA * U32 * dzc.abs() if cap is not None else 0.0)  # each term's error
    d_hidden = LAMBDA * U32 * v ** 0.5 * (dz.abs() @ w.abs()) + dze @ w.abs()
    d_weight = LAMBDA * U32 * n ** 0.5 * (dz.abs().t() @ h.abs()) + dze.t() @ h.abs()
    d_bias = LAMBDA * U32 * n ** 0.5 * dz.abs().sum(0) + dze.sum(0)
    loss = float((upstream.abs() * out).sum()) if upstream is not None else None
    return out, [d_hidden, d_weight, d_bias], loss


def _check(gt, fast, same, bounds, names=("logp", "entropy", "d_hidden", "d_weight", "d_bias")):
    (gt_out, gt_grads), (out, grads), (same_out, same_grads) = gt, fast, same
    out_tol, grad_tols, _ = bounds
    for name, a, f, s in zip(names[:2], gt_out, out, same_out):
        assert f.dtype == torch.float32 and f.shape == a.shape
        _within(a, f, s, out_tol, name)
    assert len(grads) == len(gt_grads)
    for name, a, f, s, tol in zip(names[2:], gt_grads, grads, same_grads, grad_tols):
        assert f.dtype == torch.float32 and f.shape == a.shape
        _within(a, f, s, tol, name)


# ==============================================================================================
# linear_logprobs
# ==============================================================================================

@pytest.mark.parametrize("impl", HEAD_IMPLS + ("triton",))
@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_elems", [None, 5 * V], ids=["one-chunk", "5-row-chunks"])
def test_linear_logprobs_softcap_matches_float64(impl, cap, bias, chunk_elems):
    if impl == "triton" and chunk_elems is not None:
        pytest.skip("chunking is the torch path's; the Triton kernels tile instead")
    h, w, b, y, g_lp, g_ent = _problem(bias=bias, seed=1)
    gt = _materialised(h, w, b, y, cap, g_lp, g_ent, torch.float64)
    same = _materialised(h, w, b, y, cap, g_lp, g_ent, torch.float32)
    if chunk_elems is None:  # the public op
        fast = _fast(ops.linear_logprobs, h, w, b, y, g_lp, g_ent, impl=impl, softcap=cap)
    else:  # 37 rows in chunks of 5: the last chunk is ragged
        fast = _fast(linear_logprobs_chunked, h, w, b, y, g_lp, g_ent, chunk_elems=chunk_elems,
                     native=impl == "native", softcap=cap)
    _check(gt, fast, same, _bounds(h, w, b, y, cap, g_lp, g_ent))


@pytest.mark.parametrize("impl", HEAD_IMPLS + ("triton",))
def test_linear_logprobs_softcap_logp_only_upstream(impl):
    """Only logp is used downstream (the entropy is not returned): the backward without entropy terms."""
    h, w, b, y, g_lp, _ = _problem(seed=2)
    zero = torch.zeros_like(g_lp)
    gt_out, gt_grads = _materialised(h, w, b, y, 2.0, g_lp, zero, torch.float64)
    same_out, same_grads = _materialised(h, w, b, y, 2.0, g_lp, zero, torch.float32)
    leaves = _leaves(h, w, b, torch.float32)
    logp = ops.linear_logprobs(leaves[0], leaves[1], y, bias=leaves[2], temperature=TEMP, impl=impl, softcap=2.0)
    grads = torch.autograd.grad((logp * g_lp.float()).sum(), leaves)
    _check((gt_out[:1], gt_grads), ([logp.detach()], list(grads)), (same_out[:1], same_grads),
           _bounds(h, w, b, y, 2.0, g_lp, zero))


@pytest.mark.parametrize("impl", HEAD_IMPLS + ("reference", "triton"))
def test_softcap_changes_the_logprobs(impl):
    """c = 2 must move the log-probs (a path that ignored the cap would fail here); a huge c must not."""
    h, w, b, y, _, _ = _problem(seed=3)
    plain = ops.linear_logprobs(h, w, y, bias=b, temperature=TEMP, impl=impl)
    capped = ops.linear_logprobs(h, w, y, bias=b, temperature=TEMP, impl=impl, softcap=2.0)
    assert (capped - plain).abs().max().item() > 0.5
    # |z / T| <= c / T = 2.86 for every logit: no log-prob can fall below -2 c / T - log V
    assert capped.min().item() >= -2 * 2.0 / TEMP - torch.log(torch.tensor(float(V))).item() - 1e-4
    loose = ops.linear_logprobs(h, w, y, bias=b, temperature=TEMP, impl=impl, softcap=1e6)
    torch.testing.assert_close(loose, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", HEAD_IMPLS + ("reference",))
def test_softcap_none_is_exactly_the_uncapped_op(impl):
    h, w, b, y, g_lp, g_ent = _problem(seed=4)
    default = _fast(ops.linear_logprobs, h, w, b, y, g_lp, g_ent, impl=impl)
    none = _fast(ops.linear_logprobs, h, w, b, y, g_lp, g_ent, impl=impl, softcap=None)
    for a, c in zip(default[0] + default[1], none[0] + none[1]):
        assert torch.equal(a, c)
    # and the uncapped op is still right against float64 ground truth
    _check(_materialised(h, w, b, y, None, g_lp, g_ent, torch.float64), default,
           _materialised(h, w, b, y, None, g_lp, g_ent, torch.float32), _bounds(h, w, b, y, None, g_lp, g_ent))


def test_softcap_float64_inputs_are_exact():
    h, w, b, y, g_lp, g_ent = _problem(seed=5)
    h, w, b = h.double(), w.double(), b.double()
    gt_out, gt_grads = _materialised(h, w, b, y, 2.0, g_lp, g_ent, torch.float64)
    out, grads = _fast(linear_logprobs_chunked, h, w, b, y, g_lp, g_ent, chunk_elems=6 * V, softcap=2.0)
    for a, c in zip(gt_out + gt_grads, out + grads):
        assert c.dtype == torch.float64
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("impl", HEAD_IMPLS)
@pytest.mark.parametrize("cap", CAPS)
def test_softcap_real_vocabulary(impl, cap):
    """A Qwen-sized vocabulary (151936) with a few tokens: 2-row chunks, the last one ragged."""
    v = 151936
    h, w, b, y, g_lp, g_ent = _problem(n=3, d=8, v=v, seed=6)
    gt = _materialised(h, w, b, y, cap, g_lp, g_ent, torch.float64)
    same = _materialised(h, w, b, y, cap, g_lp, g_ent, torch.float32)
    fast = _fast(linear_logprobs_chunked, h, w, b, y, g_lp, g_ent, chunk_elems=2 * v,
                 native=impl == "native", softcap=cap)
    _check(gt, fast, same, _bounds(h, w, b, y, cap, g_lp, g_ent))


# ==============================================================================================
# fused_policy_loss
# ==============================================================================================

def _loss_problem(seed):
    h, w, b, y, _, _ = _problem(seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    adv = torch.randn(N, generator=gen)
    mask = (torch.rand(N, generator=gen) > 0.3).float()
    mask[:2] = torch.tensor([0.0, 1.0])
    with torch.no_grad():
        lp, _ = _head(h.double(), w.double(), b.double(), y, TEMP, 2.0)
        old = (lp + 0.3 * torch.randn(N, generator=gen, dtype=torch.float64)).float()
        ref = (old.double() + 0.2 * torch.randn(N, generator=gen, dtype=torch.float64)).float()
    return h, w, b, y, adv, mask, old, ref


def _loss_and_grads(fn, h, w, b, dtype, upstream):
    leaves = _leaves(h, w, b, dtype)
    loss, stats = fn(*leaves)
    grads = torch.autograd.grad(loss * upstream, leaves)
    return loss.detach().double(), [g.double() for g in grads], stats


LOSS_CASES = [
    dict(loss_agg="token-mean"),
    dict(loss_agg="seq-mean-token-mean", dual_clip=3.0, beta=0.1, use_ref=True),
]


@pytest.mark.parametrize("impl", HEAD_IMPLS)
@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: c["loss_agg"])
@pytest.mark.parametrize("chunk_elems", [None, 5 * V], ids=["one-chunk", "5-row-chunks"])
def test_fused_policy_loss_softcap_matches_float64(impl, cap, case, chunk_elems):
    h, w, b, y, adv, mask, old, ref = _loss_problem(seed=7)
    kw = {k: x for k, x in case.items() if k != "use_ref"}
    kw["seq_ids"] = torch.arange(N) // 6
    if case.get("use_ref"):
        kw["ref_logp"] = ref
    up = 1.7  # backward must scale the stored gradients by the upstream scalar

    def fast(hh, ww, bb):
        if chunk_elems is None:
            return fused_policy_loss(hh, ww, y, adv, mask, old, bias=bb, temperature=TEMP, return_entropy=True,
                                         impl=impl, softcap=cap, **kw)
        return fused_policy_loss_chunked(hh, ww, y, adv, mask, old, bias=bb, temperature=TEMP, return_entropy=True,
                                         chunk_elems=chunk_elems, native=impl == "native", softcap=cap, **kw)

    def materialised(hh, ww, bb):
        lp, ent = _head(hh, ww, bb, y, TEMP, cap)
        kk = {k: (x.to(hh.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
              for k, x in kw.items()}
        loss, stats = policy_loss_ref(lp, old.to(hh.dtype), adv.to(hh.dtype), mask, **kk)
        return loss, dict(stats, logp=lp.detach(), entropy=ent.detach())

    gt_loss, gt_grads, gt_stats = _loss_and_grads(materialised, h, w, b, torch.float64, up)
    loss, grads, stats = _loss_and_grads(fast, h, w, b, torch.float32, up)
    same_loss, same_grads, same_stats = _loss_and_grads(materialised, h, w, b, torch.float32, up)
    # dL/dlogp in float64: how the log-probs' error reaches the loss
    lp64 = gt_stats["logp"].detach().double().clone().requires_grad_(True)
    kk = {k: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for k, x in kw.items()}
    dl_dlp, = torch.autograd.grad(policy_loss_ref(lp64, old.double(), adv.double(), mask, **kk)[0], lp64)
    out_tol, grad_tols, loss_tol = _bounds(h, w, b, y, cap, None, torch.zeros(N), upstream=up * dl_dlp)
    assert abs(loss - gt_loss) <= abs(same_loss - gt_loss) + loss_tol / up
    for name, a, f, s, tol in zip(("d_hidden", "d_weight", "d_bias"), gt_grads, grads, same_grads, grad_tols):
        _within(a, f, s, tol, name)
    for name in ("logp", "entropy"):
        _within(gt_stats[name], stats[name], same_stats[name], out_tol, name)
    assert torch.equal(grads[0][mask == 0], torch.zeros_like(grads[0][mask == 0]))  # masked tokens
    for k in ("clip_ratio/low", "clip_ratio/high"):  # fractions of tokens: equal unless one sits on a clip edge
        assert abs(stats[k].item() - same_stats[k].item()) < 1e-6
    if "ref_logp" in kw:  # a mean of k3 = e^d - d - 1, d = ref - logp: each term errs by |e^d - 1| e_i
        d = ref.double() - gt_stats["logp"].double()
        kl_tol = float(((d.exp() - 1).abs() * out_tol)[mask > 0].max())
        assert abs(stats["kl"].item() - gt_stats["kl"].item()) <= abs(same_stats["kl"].item() - gt_stats["kl"].item()) \
            + kl_tol


@pytest.mark.parametrize("impl", HEAD_IMPLS)
def test_fused_policy_loss_softcap_none_is_exactly_the_uncapped_op(impl):
    h, w, b, y, adv, mask, old, _ = _loss_problem(seed=8)
    runs = []
    for extra in ({}, {"softcap": None}):
        leaves = _leaves(h, w, b, torch.float32)
        loss, stats = fused_policy_loss(*leaves[:2], y, adv, mask, old, bias=leaves[2], temperature=TEMP,
                                            impl=impl, **extra)
        runs.append([loss.detach(), stats["logp"], *torch.autograd.grad(loss, leaves)])
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    leaves = _leaves(h, w, b, torch.float32)
    capped, _ = fused_policy_loss(*leaves[:2], y, adv, mask, old, bias=leaves[2], temperature=TEMP,
                                      impl=impl, softcap=2.0)
    assert abs(capped.item() - runs[0][0].item()) > 1e-3


def test_fused_policy_loss_softcap_no_grad_matches_grad_run():
    h, w, b, y, adv, mask, old, _ = _loss_problem(seed=9)
    with torch.no_grad():  # evaluation: no 1 - t^2 buffer, same value
        l0, s0 = fused_policy_loss_chunked(h, w, y, adv, mask, old, bias=b, temperature=TEMP, softcap=2.0,
                                           chunk_elems=5 * V)
    hh = h.clone().requires_grad_()
    l1, s1 = fused_policy_loss_chunked(hh, w, y, adv, mask, old, bias=b, temperature=TEMP, softcap=2.0,
                                       chunk_elems=5 * V)
    assert torch.equal(l0, l1.detach()) and torch.equal(s0["logp"], s1["logp"])


# ==============================================================================================
# dispatch and argument checks
# ==============================================================================================

def test_triton_policy_loss_with_softcap():
    """Both Triton paths of the policy loss apply the cap: the kernel with the objective in its
    epilogue (fasthint_kernels.fused_pg, where the loss lowers) and, for an objective that does not
    lower, linear_logprobs composed with the closure."""
    h, w, b, y, adv, mask, old, _ = _loss_problem(seed=10)
    got = fused_policy_loss(h.float(), w.float(), y, adv, mask, old, bias=b.float(), impl="triton", softcap=30.0)[0]
    want = fused_policy_loss(h.double(), w.double(), y, adv, mask, old, bias=b.double(), impl="torch", softcap=30.0)[0]
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)

    def token_loss(lp, s, e):  # no pg_spec: the Triton path composes linear_logprobs with this closure
        return -(lp * adv[s:e].to(lp.dtype))
    out = {}
    for name, dtype, impl in (("gt", torch.float64, "torch"), ("fast", torch.float32, "triton")):
        hh = h.detach().to(dtype).requires_grad_()
        loss = ops.fused_linear_loss(hh, w.to(dtype), y, token_loss, bias=b.to(dtype), impl=impl, softcap=2.0)[0]
        out[name] = (loss.item(), torch.autograd.grad(loss, hh)[0].double())
    assert out["fast"][0] == pytest.approx(out["gt"][0], rel=1e-5)
    torch.testing.assert_close(out["fast"][1], out["gt"][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [0, 0.0, -2.0, float("nan"), float("inf"), True, "2"])
def test_invalid_softcap_raises(bad):
    h, w, b, y, adv, mask, old, _ = _loss_problem(seed=11)
    for impl in ("torch", "reference", "auto"):
        with pytest.raises(ValueError, match="softcap must be None or a finite positive float"):
            ops.linear_logprobs(h, w, y, bias=b, impl=impl, softcap=bad)
    with pytest.raises(ValueError, match="softcap must be None or a finite positive float"):
        fused_policy_loss(h, w, y, adv, mask, old, bias=b, impl="torch", softcap=bad)
    with pytest.raises(ValueError, match="softcap must be None or a finite positive float"):
        linear_logprobs_chunked(h, w, y, softcap=bad)


def test_auto_with_softcap_on_cpu_uses_the_chunked_path():
    h, w, b, y, _, _ = _problem(seed=12)
    auto = ops.linear_logprobs(h, w, y, bias=b, temperature=TEMP, softcap=2.0)
    chosen = "native" if w.numel() >= ops.NATIVE_MIN_HEAD and native.usable(h, w) else "torch"  # a small head: torch
    assert torch.equal(auto, ops.linear_logprobs(h, w, y, bias=b, temperature=TEMP, softcap=2.0, impl=chosen))


def test_auto_with_softcap_on_cuda_probes_with_the_cap(monkeypatch):
    """On CUDA, ``auto`` with a soft-cap measures the Triton kernels with that cap (they apply it)."""
    import fasthint.autoselect as autoselect

    probes = []
    monkeypatch.setattr(autoselect, "choose_cuda_impl", lambda *a, **k: probes.append(k["softcap"]) or "triton")
    cuda_like = types.SimpleNamespace(device=torch.device("cuda"))  # only .device is consulted
    for op in ("logprobs", "policy_loss"):
        assert ops._resolve_head_impl("auto", op, cuda_like, cuda_like, TEMP, True, 2.0) == "triton"
    assert ops._resolve_head_impl("auto", "logprobs", cuda_like, cuda_like, TEMP, True, None) == "triton"
    assert probes == [2.0, 2.0, None]
