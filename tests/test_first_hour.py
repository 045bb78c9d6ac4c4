"""The first hour of a new user: errors before work, and a short run that prints no warning."""
import subprocess
import sys
import time
import warnings

from conftest import REPO


def test_missing_data_file_fails_in_seconds_on_an_empty_cache(tmp_path):
    """Nothing is built (no toy warm start, no model load) before the data is checked."""
    cmd = [sys.executable, "-m", "fasthint.train", "--data", str(tmp_path / "nope.jsonl"),
           "--cache_dir", str(tmp_path / "empty_cache"), "--output_dir", str(tmp_path / "out")]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("error: data file") and "nope.jsonl" in lines[-1] and "--data" in lines[-1]
    assert "Traceback" not in res.stderr
    assert elapsed < 10, f"the missing file was reported after {elapsed:.1f} s"
    assert not (tmp_path / "empty_cache" / "toy").exists() or \
        not any(p.name.startswith("model") for p in (tmp_path / "empty_cache" / "toy").iterdir())
    assert not (tmp_path / "out").exists()


def test_a_short_run_raises_no_warning(tmp_path, caplog):
    """Every warning (DeprecationWarning included) and every WARNING log record during a short toy run
    fails the test: a deprecated API in the hot loop shows up here before it breaks."""
    import fasthint

    cfg = fasthint.TrainConfig(max_steps=2, output_dir=str(tmp_path / "o"), cache_dir=str(tmp_path / "c"),
                               toy_warmstart_steps=2, toy_train_size=40, eval_max_prompts=8, prompts_per_step=2,
                               num_generations=4, max_new_tokens=16, progress_bar=False, save_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fasthint.fit(cfg)
    shown = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    assert not shown, "\n".join(shown)
    logged = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= 30]
    assert not logged, "\n".join(logged)
