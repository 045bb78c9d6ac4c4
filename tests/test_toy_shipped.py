"""The seed-0 toy ships with fasthint (fasthint/toy/warmstart/): every machine starts the default run
from the same weights, and its hash is the one the README states.

A rebuild (``--toy_rebuild``) is the same recipe run here: on the recording machine (the CPU and
vector ISA in toy.json) it gives the shipped weights within RECORDING_TOL; on another CPU the 1000
warm-start steps round differently and end somewhere else entirely (rebuilt here under
ATEN_CPU_CAPABILITY=avx2 and =default: relative weight distance 1.16 and 1.02; greedy accuracy on
levels 1-4 59/18/4/0% and 34/12/0/0% where the shipped toy has 59/7/1/0%), which is why it ships.
There a rebuild must still be a toy that learned the task: level-1 greedy accuracy >= CROSS_CPU_LEVEL1.
"""
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from fasthint.models import resolve_model_path
from fasthint.toy.model import SHIPPED_DIR, SHIPPED_KEY, TOY_VERSION, build_tokenizer, cpu_name, shipped_toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(SHIPPED_DIR, "model.safetensors")
RECORDING_TOL = 0.0  # measured: a rebuild on the recording machine is bit-identical (docs/RESULTS.md)
# level-1 greedy accuracy of a rebuild elsewhere; measured: 0.59 (AVX-512), 0.59 (AVX2), 0.34 (scalar)
CROSS_CPU_LEVEL1 = 0.25


def _meta() -> dict:
    with open(os.path.join(SHIPPED_DIR, "toy.json")) as fh:
        return json.load(fh)


def test_shipped_toy_hash_is_the_readmes():
    with open(WEIGHTS, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    with open(os.path.join(REPO, "README.md")) as fh:
        stated = re.findall(r"sha256 `([0-9a-f]{64})`", fh.read())
    assert stated == [digest], "README.md must state the shipped toy's sha256 once: sha256 `<hex>`"
    meta = _meta()
    assert meta["sha256"] == digest and meta["toy_version"] == TOY_VERSION
    assert (meta["seed"], meta["warmstart_steps"]) == SHIPPED_KEY
    assert os.path.getsize(WEIGHTS) < 4_000_000  # fp32, 0.87M parameters


def test_the_default_toy_is_the_shipped_one_and_builds_nothing(tmp_path):
    assert shipped_toy() == SHIPPED_DIR
    assert resolve_model_path("toy", str(tmp_path), *SHIPPED_KEY) == SHIPPED_DIR
    assert not os.path.exists(tmp_path / "toy")  # no warm start, nothing written to the cache


def test_other_toys_and_rebuilds_are_built_into_the_cache(tmp_path):
    other = resolve_model_path("toy", str(tmp_path), 1, 2)
    again = resolve_model_path("toy", str(tmp_path), SHIPPED_KEY[0], 2, rebuild=True)
    for p in (other, again):
        assert p.startswith(str(tmp_path)) and os.path.isfile(os.path.join(p, "model.safetensors"))
        with open(os.path.join(p, "toy.json")) as fh:
            meta = json.load(fh)
        assert meta["toy_version"] == TOY_VERSION and meta["cpu"] == cpu_name()
    assert resolve_model_path("toy", str(tmp_path), 1, 2) == other  # cached: not built twice


def test_the_shipped_tokenizer_is_the_built_one():
    from transformers import AutoTokenizer

    loaded, built = AutoTokenizer.from_pretrained(SHIPPED_DIR), build_tokenizer()
    text = "<|im_start|>user\n27*22+89-42=?<|im_end|>\n\\boxed{-7} é"
    assert loaded(text)["input_ids"] == built(text)["input_ids"]
    assert loaded.chat_template == built.chat_template and loaded.eos_token_id == built.eos_token_id


def _greedy_accuracy(path: str, tmp: str) -> dict:
    """No-hint greedy accuracy per level on the toy's held-out set (100 problems per level)."""
    from fasthint.toy.task import ensure_toy_data
    from fasthint.data import render_chat
    from fasthint.engines.base import SamplingConfig
    from fasthint.engines.hf import HFEngine
    from fasthint.rewards import math_reward
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, eval_path = ensure_toy_data(tmp, SHIPPED_KEY[0], 10)
    with open(eval_path) as fh:
        rows = [json.loads(line) for line in fh]
    tok = AutoTokenizer.from_pretrained(path)
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(path), tok)
    outs = engine.generate([render_chat(tok, [{"role": "user", "content": r["question"]}]) for r in rows],
                           SamplingConfig(n=1, temperature=0.0, max_new_tokens=64))
    acc: dict = {}
    for r, o in zip(rows, outs):
        acc.setdefault(r["level"], []).append(math_reward(tok.decode(o.token_ids, skip_special_tokens=True),
                                                          r["answer"]))
    return {lv: sum(v) / len(v) for lv, v in sorted(acc.items())}


@pytest.mark.slow
def test_the_shipped_toy_equals_a_rebuild(tmp_path):
    from safetensors.torch import load_file

    # the full warm start, as `--toy_rebuild true` runs it: in a fresh process (inside the test session
    # the same code gave other weights: MKL's kernels may round differently with the buffers' alignment)
    code = ("import sys; from fasthint.models import resolve_model_path; "
            f"print(resolve_model_path('toy', sys.argv[1], {SHIPPED_KEY[0]}, {SHIPPED_KEY[1]}, rebuild=True))")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    rebuilt = res.stdout.strip().splitlines()[-1]
    a, b = load_file(os.path.join(rebuilt, "model.safetensors")), load_file(WEIGHTS)
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    if cpu_name() == _meta()["cpu"] and torch.get_num_threads() == _meta()["threads"]:
        assert diff <= RECORDING_TOL, f"rebuilt on the recording machine, max |weight diff| {diff:.3e}"
    else:  # another CPU: the same recipe, a toy that learned the task
        acc = _greedy_accuracy(rebuilt, str(tmp_path))
        assert acc[1] >= CROSS_CPU_LEVEL1, (acc, diff)
