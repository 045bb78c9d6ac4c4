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
