"""fasthint's native CPU row kernels (``csrc/fused_logprobs.cpp``), built on first use.

The chunked torch path (``chunked.py``, ``fused_loss.py``) keeps its algorithm and its one
``[rows, V]`` workspace; with ``native=True`` the per-row work after each chunk's BLAS call runs in
C++ instead of a dozen torch passes over the workspace (formulas and memory claim: the .cpp header):

    torch.ops.fasthint_native.softmax_stats_(z, bias, 1/T, targets, entropy) -> (lse, z_y, entropy)
    torch.ops.fasthint_native.logit_grad_(z, bias, 1/T, raw, targets, lse, g, e, entropy)   # z -> dz

The extension is compiled with ``torch.utils.cpp_extension.load`` (g++ and ninja; never a second
torch) into ``$FASTHINT_CACHE/native`` (default ``~/.cache/fasthint/native``), once per torch version,
and loaded from there afterwards. Without a compiler (or with ``FASTHINT_NATIVE=0``) :func:`available`
is False, one line is logged, and callers keep the torch path.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
from typing import Optional

import torch

log = logging.getLogger("fasthint")
SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc",
                      "fused_logprobs.cpp")
_loaded: Optional[bool] = None
_why = ""


def _build_dir() -> str:
    root = os.environ.get("FASTHINT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fasthint"))
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"
    path = os.path.join(root, "native", tag)
    os.makedirs(path, exist_ok=True)
    return path


def _ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH: add the pip package's binary (the venv may not be active)."""
    try:
        import ninja  # lazy: optional (the build finds ninja on PATH without it)

        dirs = [getattr(ninja, "BIN_DIR", ""), os.path.dirname(sys.executable)]
    except ImportError:
        dirs = [os.path.dirname(sys.executable)]
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([d for d in dirs if d and d not in path.split(os.pathsep)] + [path])


@contextlib.contextmanager
def _build_lock(build_dir: str):
    """One build at a time, under an OS file lock that dies with its process. torch's own build lock
    is a plain file (``lock``) that a process killed mid-build leaves behind, after which every later
    build waits for it forever; under this lock no live build holds it, so a leftover one is removed."""
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "fasthint.flock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        stale = os.path.join(build_dir, "lock")
        if os.path.exists(stale):
            log.warning("fasthint: removing the build lock %s left by an interrupted build", stale)
            os.remove(stale)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def available() -> bool:
    """Builds (first call per torch version) and loads the extension; False, with one log line, when
    it cannot be built here."""
    global _loaded, _why
    if _loaded is not None:
        return _loaded
    if os.environ.get("FASTHINT_NATIVE", "1") == "0":
        _loaded, _why = False, "FASTHINT_NATIVE=0"
    elif not os.path.isfile(SOURCE):
        _loaded, _why = False, f"source {SOURCE} not found (install fasthint from its repository with -e)"
    else:
        try:
            from torch.utils import cpp_extension  # lazy: imports setuptools; only a build needs it

            _ninja_on_path()

            with _build_lock(_build_dir()):
                cpp_extension.load(name="fasthint_native", sources=[SOURCE], build_directory=_build_dir(),
                                   extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                   is_python_module=False, verbose=False)
            _loaded = hasattr(torch.ops.fasthint_native, "softmax_stats_")
            _why = "" if _loaded else "the built library registers no ops"
        except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a build error: keep the torch path
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _loaded, _why = False, f"{type(e).__name__}: {first[:200]}"
    if not _loaded:
        log.warning("fasthint native CPU kernels unavailable (%s): using the chunked torch path", _why)
    return _loaded


def why_unavailable() -> str:
    return _why


def usable(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """The native kernels serve CPU tensors whose workspace is float32 (fp32/bf16/fp16 inputs)."""
    return (hidden.device.type == "cpu" and weight.device.type == "cpu" and hidden.dtype != torch.float64
            and weight.dtype != torch.float64 and available())
