"""bench/logprobs.py end to end on CPU at a tiny shape: every provider runs in its own process (the
Triton kernels under the interpreter), one table per shape with the time over the bare-matmul floor,
the issue's goal lines, and rows appended to the results file; bad shapes give one clear line."""
import csv
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "logprobs.py")


def _bench(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the bench sets it per provider
    return subprocess.run([sys.executable, BENCH, "--results", str(tmp_path / "r.csv"), *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_tables_goals_and_rows(tmp_path):
    res = _bench(tmp_path, "--shape", "64,32,600;32,32,600", "--ops", "policy_loss,logprobs", "--providers",
                 "triton,chunked,matmuls", "--repeat", "1", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert out.count("forward+backward, N=") == 2 and "x floor" in out
    assert "goal: triton within 1.15x of the 4 bare GEMMs" in out
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert {(r["n"], r["provider"]) for r in rows} == {(n, p) for n in ("64", "32")
                                                       for p in ("triton", "chunked", "matmuls")}
    assert len(rows) == 10  # per shape: triton and chunked for both ops, one floor
    assert all(float(r["median_ms"]) > 0 and r["commit"] for r in rows)


def test_bad_shape_is_one_line(tmp_path):
    res = _bench(tmp_path, "--shape", "64,32")
    assert res.returncode != 0 and "expected N,D,V" in res.stderr and "Traceback" not in res.stderr
    res = _bench(tmp_path, "--shape", "60,32,600")
    assert res.returncode != 0 and "multiple of 16" in res.stderr
