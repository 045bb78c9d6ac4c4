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
