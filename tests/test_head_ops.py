"""The Triton head's custom ops (``torch.ops.fasthint.head_logprobs``, ``head_backward``, ``pg_forward``):
their fake implementations give the shapes, dtypes and workspaces that the kernels give
(``torch.library.opcheck`` runs both and compares every output), and under FakeTensorMode a memory
tracker counts the backward's workspaces, so the rehearsal (``python -m fasthint.rehearse``) sees what
the GPU's head allocates."""
import pytest
import torch

pytest.importorskip("triton")
import fasthint_kernels.fused_pg  # noqa: E402,F401  registers fasthint::pg_forward
import fasthint_kernels.head_backward as hb  # noqa: E402
import fasthint_kernels.logprobs  # noqa: E402,F401  registers fasthint::head_logprobs

CHECKS = ("test_schema", "test_faketensor")
N, D, V = 37, 48, 1031


def _problem(dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(dtype)
    w = (0.1 * torch.randn(V, D, generator=g)).to(dtype)
    b = (0.1 * torch.randn(V, generator=g)).to(dtype) if bias else None
    return h, w, b, torch.randint(0, V, (N,), generator=g)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_head_logprobs_fake_matches_the_kernel(softcap):
    h, w, b, y = _problem()
    torch.library.opcheck(torch.ops.fasthint.head_logprobs.default, (h, w, b, y, 0.7, softcap, True), test_utils=CHECKS)


@pytest.mark.parametrize("backward,filter_eps", [("split", None), ("atomic", None), ("atomic", 1e-4)])
@pytest.mark.parametrize("dtype,needs", [(torch.float32, (True, True, True)), (torch.float32, (True, False, False)),
                                         (torch.float16, (True, True, False)), (torch.float16, (False, True, False))])
def test_head_backward_fake_matches_the_kernel(backward, filter_eps, dtype, needs):
    """Every output, the workspaces included (the dz buffer, an fp32 accumulator that was cast), in
    both backwards, with and without each gradient, fp32 and half inputs."""
    h, w, b, y = _problem(dtype, bias=needs[2])
    _, lse, ent, _ = torch.ops.fasthint.head_logprobs(h.float(), w.float(), None, y, 0.7, None, True)
    g, ge = torch.randn(N), torch.randn(N)
    args = (h, w, b, y, lse, ent, g, ge, None, 0.7, 30.0 if dtype == torch.float16 else None, filter_eps, *needs,
            backward)
    torch.library.opcheck(torch.ops.fasthint.head_backward.default, args, test_utils=CHECKS)


def test_pg_forward_fake_matches_the_kernel():
    h, w, b, y = _problem()
    g = torch.Generator().manual_seed(1)
    old, adv, wt = torch.randn(N, generator=g) - 3, torch.randn(N, generator=g), torch.rand(N, generator=g)
    args = (h, w, b, y, old, adv, wt, torch.rand(N, generator=g), None, old + 0.1, 0.2, 0.28, 3.0, 0.04, 0.01, 0.7,
            None)
    torch.library.opcheck(torch.ops.fasthint.pg_forward.default, args, test_utils=CHECKS)


def test_a_fake_backward_counts_its_workspaces():
    """Qwen2.5-7B's head (D 3,584, V 152,064, bf16) on 16,384 tokens under FakeTensorMode, inside
    torch's MemTracker: the split backward's peak holds the dz buffer (2^28 bf16 elements), the fp32
    dH accumulator and its bf16 copy, and dW: the bytes counted by hand, with nothing allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    n, d, v, bf16 = 16384, 3584, 152064, torch.bfloat16
    with FakeTensorMode():
        h, w = torch.empty(n, d, dtype=bf16), torch.empty(v, d, dtype=bf16)
        y, vec = torch.zeros(n, dtype=torch.long), torch.empty(n)
        tracker = MemTracker()
        with tracker:
            grads = hb.head_backward(h, w, None, y, vec, vec, vec, None, temperature=1.0, softcap=None, scale=None,
                                     filter_eps=None, needs=(True, True, False), backward="split")
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    cols = hb._split_cols(n, v)
    assert cols * n <= hb.SPLIT_ELEMS and cols == 16384
    want = n * cols * 2 + n * d * 4 + n * d * 2 + v * d * 2  # dz + fp32 dH + dH (bf16) + dW (bf16)
    assert peak == want, (peak, want)
    assert grads[0].shape == (n, d) and grads[1].shape == (v, d) and grads[2] is None


@pytest.mark.parametrize("backward", ["split", "atomic"])
def test_no_tokens_give_empty_outputs_and_zero_gradients(backward, monkeypatch):
    """An empty micro-batch or recompute chunk (N = 0) reaches the ops: no launch (a zero grid, which
    ``forward_splits`` divided by on CUDA), empty log-probs and zero weight gradients; fake and real agree."""
    from fasthint_kernels.fused_pg import fused_pg_loss
    from fasthint_kernels.logprobs import forward_splits, linear_logprobs_triton
    from fasthint_kernels.spec import PGSpec

    monkeypatch.setattr(hb, "DEFAULT_BACKWARD", backward)
    h, w, b, _ = _problem()
    h = h[:0].clone().requires_grad_(True)
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y = torch.zeros(0, dtype=torch.long)
    logp, ent = linear_logprobs_triton(h, w, y, bias=b, temperature=0.7, return_entropy=True)
    assert logp.shape == ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert h.grad.shape == (0, D) and w.grad.abs().sum() == 0 and b.grad.abs().sum() == 0
    empty = torch.zeros(0)
    loss, lp, _ = fused_pg_loss(h, w, y, PGSpec(empty, empty, empty), bias=b, impl="triton", backward=backward)
    assert loss.item() == 0 and lp.shape == (0,)
    torch.library.opcheck(torch.ops.fasthint.head_backward.default,
                          (h.detach(), w.detach(), None, y, empty, empty, empty, None, None, 1.0, None, None,
                           True, True, False, backward), test_utils=CHECKS)
    assert forward_splits(0, V, D, 4, torch.device("cpu")) == 1


def test_forward_splits_on_cuda_at_any_n(monkeypatch):
    """The forward's vocabulary splits on an H100 (132 SMs, 50 MB of L2) at Qwen2.5-7B's head in bf16:
    enough programs to fill the SMs when N is small (N = 0 included: it divided by zero), and from
    N = 4k on, enough for the resident programs' H tiles (264 / splits tiles of 0.46 MB) to stay within
    half of L2: 5 splits hold 24 MB. A small D needs no more than the fill; CPU sweeps in one."""
    from types import SimpleNamespace

    import fasthint_kernels.logprobs as lp

    h100 = SimpleNamespace(multi_processor_count=132, L2_cache_size=50 * 2**20)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h100)
    cuda = torch.device("cuda", 0)
    assert [lp.forward_splits(n, 152064, 3584, 2, cuda) for n in (0, 64, 1024, 4096, 16384, 65536)] == \
        [16, 16, 16, 5, 5, 5]
    assert [lp.forward_splits(n, 152064, 896, 2, cuda) for n in (4096, 16384, 65536)] == [5, 2, 2]
    assert lp.forward_splits(16384, 152064, 3584, 2, torch.device("cpu")) == 1
