"""fasthint.eval: unbiased pass@k against enumeration, the before/after classifier on a hand-made
table, the benchmark loaders on the real files in ../shared/data/benchmarks, and the CLI end to end."""
import itertools
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, save_toy_checkpoint
from fasthint.benchmarks import load_benchmark, load_benchmarks
from fasthint.errors import DataError
from fasthint.eval import benchmark_metrics, classify, compare_counts, ks_for, pass_at_k

BENCH = os.path.join(os.path.dirname(REPO), "shared", "data", "benchmarks")
needs_bench = pytest.mark.skipif(not os.path.isdir(BENCH), reason="../shared/data/benchmarks not present")


def _enumerated(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_enumerated(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges():
    assert pass_at_k(16, 0, 1) == 0.0 and pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0 and pass_at_k(16, 1, 16) == 1.0  # k = n: any correct sample
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    assert pass_at_k(16, 15, 2) == 1.0  # n - c < k
    for bad in ((4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)
    assert ks_for(16) == [1, 2, 4, 8, 16] and ks_for(12) == [1, 2, 4, 8, 12] and ks_for(1) == [1]


def test_benchmark_metrics_average_over_problems():
    m = benchmark_metrics([0, 4, 2], 4)
    assert m["avg@4"] == pytest.approx(6 / 12)
    assert m["pass@1"] == pytest.approx((0 + 1 + 0.5) / 3)
    assert m["pass@2"] == pytest.approx((0 + 1 + (1 - 1 / 6)) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)


def test_compare_classifier_on_a_hand_made_table():
    n = 16
    before = {"a": 0, "b": 3, "c": 12, "d": 10, "e": 0, "f": 1}
    after = {"a": 9, "b": 16, "c": 14, "d": 2, "e": 0, "f": 7}
    want = {"a": "capability_gain", "b": "self_distillation", "c": "solved_both", "d": "regression",
            "e": "unsolved_both", "f": "unsolved_both"}
    assert {u: classify(before[u], after[u], n) for u in before} == want
    out = compare_counts(before, after, n)
    assert out["problems"] == want and out["n"] == 16 and out["num_problems"] == 6
    assert (out["capability_gain"], out["self_distillation"], out["regression"], out["unsolved_both"]) == (1, 1, 1, 2)
    assert out["unsolved_both_frac"] == pytest.approx(2 / 6)
    assert classify(7, 8, n, threshold=0.25) == "solved_both"  # the threshold decides "solved"


@needs_bench
def test_every_benchmark_file_loads_with_its_answer_source():
    b = load_benchmarks(BENCH)
    sizes = {k: len(v) for k, v in b.items()}
    assert sizes == {"aime24": 30, "amc23": 40, "math500": 500, "minerva_math": 272, "olympiadbench": 675}
    src = {k: {r["answer_source"] for r in v} for k, v in b.items()}
    assert src["minerva_math"] == {"solution's last \\boxed{}"} and src["olympiadbench"] == {"final_answer"}
    assert b["amc23"][0]["answer"] == "27"  # the float 27.0 as users' files give it
    assert b["minerva_math"][0]["answer"] == "1.6"
    assert all(r["question"] and r["answer"] for rows in b.values() for r in rows)
    assert all(len({r["uid"] for r in rows}) == len(rows) for rows in b.values())


@needs_bench
def test_every_math500_reference_solution_is_rewarded():
    from fasthint.rewards import RewardScorer

    rows = load_benchmark(os.path.join(BENCH, "math500.jsonl"))
    scorer = RewardScorer(timeout_s=10)
    try:
        rewards = scorer.score([r["solution"] for r in rows], [r["answer"] for r in rows])
    finally:
        scorer.close()
    assert sum(rewards) == len(rows) == 500


def test_unknown_layout_is_one_clear_error(tmp_path):
    p = tmp_path / "odd.jsonl"
    p.write_text(json.dumps({"problem": "1+1?", "gold": "2"}) + "\n")
    with pytest.raises(DataError, match=r"row 0 has no usable gold answer.*columns: \['gold', 'problem'\]"):
        load_benchmark(str(p))
    with pytest.raises(DataError, match="not found"):
        load_benchmarks(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .jsonl or .parquet"):
        load_benchmarks(str(tmp_path / "empty"))


@pytest.mark.slow
def test_eval_cli_end_to_end_on_a_toy_checkpoint(tmp_path):
    ckpt = save_toy_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "bench"
    data.mkdir()
    (data / "plain.jsonl").write_text("".join(json.dumps({"problem": f"{i}+1=?", "answer": str(i + 1)}) + "\n"
                                              for i in range(3)))
    (data / "boxed.jsonl").write_text(json.dumps({"problem": "2*3=?", "solution": "so \\boxed{6}"}) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fasthint.eval", "--model", str(ckpt), "--data", str(data), "--n", "4",
           "--max_new_tokens", "8", "--compare", str(ckpt), "--output_dir", str(out)]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| after | plain | 3 |" in res.stdout and "capability_gain" in res.stdout
    r = json.load(open(out / "eval_results.json"))
    assert set(r["after"]["benchmarks"]) == {"plain", "boxed"} and r["n"] == 4
    for label in ("before", "after"):
        for name, m in r[label]["benchmarks"].items():
            counts = list(r[label]["correct_counts"][name].values())
            assert all(0 <= c <= 4 for c in counts) and m == pytest.approx(benchmark_metrics(counts, 4))
    assert sum(r["compare"]["plain"][k] for k in ("self_distillation", "capability_gain", "regression",
                                                  "solved_both", "unsolved_both")) == 3
    assert (out / "pass_at_k.png").stat().st_size > 1000
    bad = subprocess.run([sys.executable, "-m", "fasthint.eval", "--model", str(ckpt), "--data",
                          str(tmp_path / "nope.jsonl")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if line.startswith("error:")][0].count("nope.jsonl") == 1
