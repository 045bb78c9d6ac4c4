"""The first hour of a new user: errors before work, and a short run that prints no warning."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import warnings

import pytest

from conftest import REPO

HEAVY = ("torch", "transformers", "math_verify")
# `python -m fasthint.train ARGS` as runpy runs it, then which heavy packages were imported
AS_MAIN = (
    "import json, runpy, sys\n"
    "sys.argv = ['fasthint.train', *sys.argv[1:]]\n"
    "code = None\n"
    "try:\n"
    "    runpy.run_module('fasthint.train', run_name='__main__', alter_sys=True)\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    f"print(json.dumps({{'code': code, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
)


def _toy_model_built(cache) -> bool:
    toy = cache / "toy"
    return toy.exists() and any(p.name.startswith("model") for p in toy.iterdir())


def test_missing_data_file_fails_in_seconds_on_an_empty_cache(tmp_path):
    """Nothing is built (no toy warm start, no model load) before the data is checked; the check
    comes before torch is imported (see below), so the answer takes about a second."""
    cmd = [sys.executable, "-m", "fasthint.train", "--data", str(tmp_path / "nope.jsonl"),
           "--cache_dir", str(tmp_path / "empty_cache"), "--output_dir", str(tmp_path / "out")]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr[-2000:]
    assert lines[-1].startswith("error: data file") and "nope.jsonl" in lines[-1] and "--data" in lines[-1]
    assert "Traceback" not in res.stderr
    assert elapsed < 5, f"the missing file was reported after {elapsed:.1f} s"
    assert not _toy_model_built(tmp_path / "empty_cache")
    assert not (tmp_path / "out").exists()


def _bad_command_lines(tmp_path) -> list:
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "bad.yaml").write_text("max_steps: [1\n")
    return [
        (["--data", str(tmp_path / "nope.jsonl")], r"error: data file '.*nope\.jsonl' not found: pass --data PATH"),
        (["--eval_data", "./nope.parquet"], r"error: data file './nope\.parquet' not found: pass --eval_data PATH"),
        (["--config", str(tmp_path / "nope.yaml")], r"error: config file '.*nope\.yaml' not found"),
        (["--config", str(tmp_path / "bad.yaml")], r"error: config file '.*bad\.yaml' is not valid YAML"),
        (["--max_stepz", "3"], r"error: unrecognized arguments: --max_stepz 3: see --help"),
        (["--max_steps", "many"], r"error: --max_steps expects int, got 'many'"),
        (["--output_dir", str(tmp_path / "a_file" / "out")], r"error: --output_dir .*a_file is a file, not a folder"),
    ]


def test_bad_command_lines_are_answered_before_torch_is_imported(tmp_path):
    """A missing file, a bad flag or value, an unusable --output_dir: exit status 2 and one line on
    stderr, raised while none of torch, transformers or math-verify has been imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    for args, message in _bad_command_lines(tmp_path):  # run from tmp_path: relative paths resolve there
        res = subprocess.run([sys.executable, "-c", AS_MAIN, *args, "--cache_dir", str(tmp_path / "cache")],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out == {"code": 2, "heavy": []}, (args, out, res.stderr[-2000:])
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and re.match(message, lines[0]), (args, res.stderr[-2000:])
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("extra", [{}, {"gradient_checkpointing": True, "algo": "hint", "steps_per_generation": 2}],
                         ids=["default", "gradient-checkpointing-hint"])  # hint: no-grad scoring in train mode
# (hint as its recipe runs it, 2 optimizer steps per rollout batch; with 1, AAPO cannot act and says so)
def test_a_short_run_raises_no_warning(tmp_path, caplog, extra):
    """Every warning (DeprecationWarning included) and every WARNING log record during a short toy run
    fails the test: a deprecated API in the hot loop shows up here before it breaks."""
    import fasthint

    cfg = fasthint.TrainConfig(max_steps=2, output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                               toy_warmstart_steps=2, toy_train_size=40, eval_max_prompts=8, prompts_per_step=2,
                               num_generations=4, max_new_tokens=16, progress_bar=False, save_steps=1, **extra)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fasthint.fit(cfg)
    shown = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    assert not shown, "\n".join(shown)
    logged = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= 30]
    assert not logged, "\n".join(logged)


def _cfg(tmp_path, **kw):
    import fasthint

    base = dict(max_steps=1, output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), toy_train_size=40,
                eval_data="", prompts_per_step=2, num_generations=4, max_new_tokens=8, progress_bar=False)
    return fasthint.TrainConfig(**{**base, **kw})


def test_settings_and_model_mismatches_are_refused_before_any_work(tmp_path):
    """Each case stops before the toy is built or any weights are read, and writes nothing."""
    import transformers as tf

    import fasthint
    from test_model_families import TINY, _save

    (tmp_path / "a_file").write_text("x")
    small = tf.LlamaConfig(**TINY, vocab_size=50)  # the toy tokenizer has 259 tokens
    tf.LlamaForCausalLM(small).save_pretrained(tmp_path / "small")
    from fasthint.toy.model import build_tokenizer

    build_tokenizer().save_pretrained(tmp_path / "small")
    cases = [
        (dict(output_dir=str(tmp_path / "a_file")), "--output_dir .* is a file"),
        (dict(model=str(tmp_path / "small")), "tokenizer has 259 tokens but the model's embedding has 50 rows"),
        (dict(model=_save(tmp_path, "gemma2"), attn_implementation="sdpa"), "--attn_implementation sdpa"),
        (dict(engine="vllm"), "--engine vllm needs vLLM|vllm"),
    ]
    for kw, message in cases:
        if kw.get("engine") == "vllm" and importlib.util.find_spec("vllm") is not None:
            continue  # the vLLM environment has it
        t0 = time.perf_counter()
        try:
            fasthint.fit(_cfg(tmp_path, **kw))
        except fasthint.FastHintError as e:
            assert re.search(message, str(e)), (kw, str(e))
        else:
            raise AssertionError(f"{kw} was accepted")
        assert time.perf_counter() - t0 < 10, kw
        assert not (tmp_path / "out").exists(), kw
        assert not _toy_model_built(tmp_path / "cache"), kw


def test_gemma2_with_sdpa_exits_2_with_one_line_naming_the_flag(tmp_path):
    from test_model_families import _save

    cmd = [sys.executable, "-m", "fasthint.train", "--model", _save(tmp_path, "gemma2"),
           "--attn_implementation", "sdpa", "--output_dir", str(tmp_path / "out"),
           "--cache_dir", str(tmp_path / "cache")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = [x for x in res.stderr.splitlines() if x.strip()][-1]
    assert last.startswith("error: gemma2 cannot use --attn_implementation sdpa")
    assert "--attn_implementation auto" in last
