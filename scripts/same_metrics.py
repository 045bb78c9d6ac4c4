"""Runs the default command at an earlier commit and at this working tree; are their metrics equal?

A redesign of shape (issue 15) must not change results. This script checks it the way a user would
see it: ``python -m fasthint.train`` with its defaults for ``--steps`` steps, once from a clean
checkout of ``--before`` (a git worktree) and once from this tree, each on its own fresh cache, then
every numeric metric of every step (and the pre-training evaluation) is compared. Timings and
throughput are left out. The comparison is appended to ``tests/recorded/same_metrics.jsonl`` with the
commits and the machine.

    .venv/bin/python scripts/same_metrics.py --before ea70c05 --steps 20 [--after HEAD]

Without ``--after`` the second run is this working tree as it is.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "tests", "recorded", "same_metrics.jsonl")
SKIP_PREFIXES = ("time/", "perf/", "tokens_per_s")  # wall-clock figures: never equal between two runs


def git(*args: str, cwd: str = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def run(tree: str, workdir: str, steps: int) -> dict:
    """The default command in ``tree`` for ``steps`` steps on a fresh cache; its numeric metrics."""
    out, cache = os.path.join(workdir, "out"), os.path.join(workdir, "cache")
    cmd = [sys.executable, "-m", "fasthint.train", "--max_steps", str(steps), "--output_dir", out,
           "--cache_dir", cache, "--save_steps", "0", "--progress_bar", "false"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, os.path.join(tree, "kernels")]))  # both packages
    res = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"the run in {tree} failed:\n{res.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    with open(os.path.join(out, "eval.json")) as fh:
        before = json.load(fh)["eval_before"]
    keep = lambda d: {k: v for k, v in d.items()  # noqa: E731
                      if isinstance(v, (int, float)) and not k.startswith(SKIP_PREFIXES)}
    return {"eval_before": keep(before), "steps": [keep(r) for r in rows]}


def run_at(commit: str, workdir: str, name: str, steps: int) -> dict:
    """``run`` in a clean checkout (git worktree) of ``commit``."""
    tree = os.path.join(workdir, f"tree-{name}")
    git("worktree", "add", "--detach", tree, commit)
    try:
        return run(tree, os.path.join(workdir, name), steps)
    finally:
        git("worktree", "remove", "--force", tree)


def compare(a: dict, b: dict) -> tuple[float, int, list[str], dict]:
    """Largest absolute difference over the metrics both runs report, how many, keys only one has, and
    the largest difference per key (those above zero)."""
    pairs = [(a["eval_before"], b["eval_before"])] + list(zip(a["steps"], b["steps"]))
    n, only, per_key = 0, set(), {}
    for x, y in pairs:
        only |= set(x) ^ set(y)
        for k in set(x) & set(y):
            d = abs(float(x[k]) - float(y[k]))
            per_key[k], n = max(per_key.get(k, 0.0), d), n + 1
    if len(a["steps"]) != len(b["steps"]):
        only.add(f"steps: {len(a['steps'])} vs {len(b['steps'])}")
    worst = max(per_key.values(), default=0.0)
    return worst, n, sorted(only), {k: v for k, v in sorted(per_key.items(), key=lambda kv: -kv[1]) if v > 0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="the earlier commit (e.g. the last one before a redesign)")
    p.add_argument("--after", default=None, help="a later commit (default: this working tree)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tol", type=float, default=1e-6)
    args = p.parse_args()
    before = git("rev-parse", args.before)
    with tempfile.TemporaryDirectory() as d:
        a = run_at(before, d, "a", args.steps)
        if args.after:
            after = git("rev-parse", args.after)
            b = run_at(after, d, "b", args.steps)
        else:
            dirty = git("status", "--porcelain", "--untracked-files=no")
            after = git("rev-parse", "HEAD") + ("+dirty" if dirty else "")
            b = run(REPO, os.path.join(d, "b"), args.steps)
    worst, n, only, differing = compare(a, b)
    row = {"before": before, "after": after,
           "steps": args.steps, "metrics_compared": n, "max_abs_diff": worst, "only_in_one": only,
           "differing": dict(list(differing.items())[:10]),
           "equal_within": args.tol, "passed": worst <= args.tol and not any(o.startswith("steps") for o in only),
           "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}",
           "command": f"python scripts/same_metrics.py --before {args.before} --steps {args.steps}"}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
    sys.exit(0 if row["passed"] else 1)


if __name__ == "__main__":
    main()
