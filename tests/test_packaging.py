"""The kernel package has a distinct name: no top-level `kernels` may shadow Hugging Face's."""
import importlib.util
import os
import subprocess
import sys

from conftest import REPO


def test_no_toplevel_kernels_package():
    assert not os.path.exists(os.path.join(REPO, "kernels", "__init__.py"))
    assert os.path.isfile(os.path.join(REPO, "kernels", "fasthint_kernels", "__init__.py"))
    import fasthint_kernels

    assert os.path.dirname(fasthint_kernels.__file__) == os.path.join(REPO, "kernels", "fasthint_kernels")


def test_transformers_model_loading_from_repo_root(tmp_path):
    code = (
        "import importlib.util, transformers\n"
        "from transformers import AutoModelForCausalLM, Qwen2Config\n"
        "cfg = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=2)\n"
        "m = AutoModelForCausalLM.from_config(cfg)\n"
        f"m.save_pretrained({str(tmp_path)!r})\n"
        f"AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "from transformers.utils import import_utils\n"
        "import importlib.metadata as md\n"
        "try:\n    md.version('kernels'); real = True\nexcept md.PackageNotFoundError:\n    real = False\n"
        "assert real or not import_utils.is_kernels_available(), 'repo kernels/ folder taken for HF kernels'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_public_api_importable():
    import fasthint
    from fasthint import loss, ops

    for name in ("TrainConfig", "fit", "math_reward", "parse_args"):
        assert hasattr(fasthint, name)
    for name in ("group_advantages", "linear_logprobs", "fused_linear_loss"):
        assert callable(getattr(ops, name))
    for name in ("policy_loss", "fused_policy_loss", "make_objective", "ClippedSurrogate"):
        assert hasattr(loss, name)
    assert importlib.util.find_spec("fasthint.train") is not None


def test_config_reference_is_current():
    import runpy

    table = runpy.run_path(os.path.join(REPO, "scripts", "config_table.py"))["table"]()
    doc = open(os.path.join(REPO, "docs", "CONFIG.md")).read()
    assert table in doc, "docs/CONFIG.md config reference is stale: run python scripts/config_table.py"


def _lock(name: str) -> dict:
    out = {}
    with open(os.path.join(REPO, "locks", name)) as fh:
        for line in fh:
            line = line.split("#")[0].strip()
            if line:
                pkg, version = line.split("==")
                out[pkg.lower().replace("_", "-")] = version
    return out


def test_environment_matches_the_lock():
    """The figures in docs/RESULTS.md and tests/recorded/ hold for locks/cpu.txt's exact versions:
    every locked package is installed at its version, and nothing else is installed (a new
    dependency must enter the lock: bash scripts/lock.sh)."""
    from importlib import metadata

    lock = _lock("cpu.txt")
    installed: dict = {}
    for d in metadata.distributions():  # not the copies setuptools vendors (it may put them on sys.path)
        if "_vendor" not in str(getattr(d, "_path", "")):
            installed.setdefault(d.metadata["Name"].lower().replace("_", "-"), d.version)
    wrong = {k: (v, installed.get(k)) for k, v in lock.items() if installed.get(k, "").split("+")[0] != v}
    assert not wrong, f"installed versions differ from locks/cpu.txt (locked, installed): {wrong}: " \
        "run bash scripts/setup.sh"
    extra = sorted(set(installed) - set(lock) - {"fasthint", "pip", "setuptools", "wheel"})
    assert not extra, f"installed but not in locks/cpu.txt: {extra}; add them with bash scripts/lock.sh"
    assert "transformers" in lock and "math-verify" in lock and "numpy" in lock
