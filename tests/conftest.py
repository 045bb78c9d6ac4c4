import os
import shutil

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, Triton kernels run in its interpreter on CPU tensors; the variable must be set
# before triton is first imported.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")


def save_toy_checkpoint(path, seed: int = 0) -> str:
    """An untrained toy model and its tokenizer saved as a Hugging Face directory at ``path``."""
    import torch

    from fasthint.toy.model import build_model, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    build_model(tok, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def cpu_head_impls():
    """The CPU implementations of the head ops to test: torch, and native where its C++ kernels build
    (they need g++ and ninja; CI (CI=true) must build them, so there they never skip)."""
    import pytest

    from fasthint_kernels import native

    return ("torch", pytest.param("native", marks=pytest.mark.skipif(
        not os.environ.get("CI") and not native.available(),
        reason=f"native CPU kernels not built here: {native.why_unavailable()}")))


def single_thread():
    """A module fixture for tiny problems: intra-op threading only adds contention on a loaded machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def chunked_policy_loss(hidden, weight, targets, advantages, mask, old_logp, *, bias=None, temperature=1.0,
                        return_entropy=False, chunk_elems=None, native=False, softcap=None, **objective_kwargs):
    """The policy objective (``fasthint.loss.make_objective``) through the chunked kernel directly, with
    its chunk size exposed: ``(loss, stats)`` as ``fasthint.loss.fused_policy_loss``."""
    import torch

    from fasthint.loss import make_objective
    from fasthint_kernels.fused_loss import fused_linear_loss_chunked

    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    obj = make_objective(old_logp, advantages, mask, dtype=acc, **objective_kwargs)
    loss, logp, ent = fused_linear_loss_chunked(hidden, weight, targets, obj.token_loss, bias=bias,
                                                temperature=temperature, return_entropy=return_entropy,
                                                chunk_elems=chunk_elems, native=native, softcap=softcap,
                                                uses_entropy=obj.uses_entropy)
    stats = {**obj.stats(logp), "logp": logp}
    if ent is not None:
        stats["entropy"] = ent
    return loss, stats
