"""Compiles every Triton kernel ahead of time for sm_80 and sm_90, without a GPU; a CSV and a verdict.

    python scripts/kernels_compile.py [--level ci|configs|full] [--jobs 2] [--csv PATH] [--only NAME] [--resume CSV]

What is compiled at each level: ``fasthint_kernels.aot.plan`` (``ci``: minutes on 2 cores, run by
tests/test_kernels_compile.py; ``configs``: every kept tile configuration x dtype x (all switches on,
each alone), the committed ``bench/results/kernels_compile.csv``; ``full``: every switch combination,
hours). Each row: the kernel, target, input dtype, switches on, tile config, whether it compiled, its
shared memory against the target's limit and against the autotuner's estimate (``tiles.shared_estimate``,
which prunes configs on a GPU), registers and spill bytes (``ptxas -v``), seconds, and the error.
Exit 1 when a kernel does not compile, a kept config needs more shared memory than its target has,
or the estimate is below what Triton allocated (the pruner would keep a config that cannot launch).
Triton must run its compiler, not its interpreter: TRITON_INTERPRET is cleared here.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, fields

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported anywhere
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "kernels")]
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (it warns otherwise)


def _job(args: tuple) -> dict:
    level, index, usage, only = args
    from fasthint_kernels import aot

    k, target, dtype, switches, cfg = aot.plan(level, only=only)[index]
    return asdict(aot.compile_one(k, target, dtype, switches, cfg, usage=usage))


def key(kernel: str, target, dtype: str, switches, config: str) -> tuple:
    """A compile's identity: kernel, target, dtype, the switches on (a dict or a CSV label), config."""
    label = switches if isinstance(switches, str) else ",".join(s for s, on in switches.items() if on) or "-"
    return kernel, int(target), dtype, label, config


def _earlier_rows(path: str, planned: set) -> dict:
    """The rows of an earlier run's CSV that this run plans too, typed as fresh ones."""
    ints = ("target", "shared", "estimate", "limit", "registers", "spill_stores", "spill_loads")
    out = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            r = {**r, **{k: int(r[k]) for k in ints}, "seconds": float(r["seconds"]), "ok": r["ok"] == "True",
                 "fits": r["fits"] == "True"}
            kk = key(r["kernel"], r["target"], r["dtype"], r["switches"], r["config"])
            if kk in planned:
                out[kk] = r
    return out


def problems(rows: list[dict]) -> list[str]:
    """One line per row that fails the check."""
    out = []
    for r in rows:
        where = f"{r['kernel']} sm_{r['target']} {r['dtype']} [{r['switches']}] {r['config']}"
        if not r["ok"]:
            out.append(f"{where}: does not compile: {r['error']}")
        elif r["shared"] > r["limit"]:
            out.append(f"{where}: needs {r['shared']} B of shared memory, the target has {r['limit']}")
        elif r["estimate"] and r["estimate"] < r["shared"]:
            out.append(f"{where}: the pruner's estimate {r['estimate']} B is below the {r['shared']} B allocated")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", default="ci", choices=("ci", "configs", "full"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--csv", default=None, help="write the rows here (default: print the summary only)")
    ap.add_argument("--only", default=None, help="kernels whose name contains this")
    ap.add_argument("--no_usage", action="store_true", help="skip ptxas -v (registers, spills)")
    ap.add_argument("--resume", default=None, help="a CSV (or CSV.part) of an earlier run: its rows are kept and "
                                                   "only the missing compiles run")
    args = ap.parse_args(argv)
    import triton

    from fasthint_kernels import aot

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()  # the source compiled (read when the workers start)
    plan = [key(k.name, t, d, sw, aot.config_name(c)) for k, t, d, sw, c in aot.plan(args.level, only=args.only)]
    earlier = _earlier_rows(args.resume, set(plan)) if args.resume else {}
    jobs = [(args.level, i, not args.no_usage, args.only) for i, kk in enumerate(plan) if kk not in earlier]
    fieldnames = [f.name for f in fields(aot.Compiled)] + ["fits", "triton", "commit"]
    part = args.csv + ".part" if args.csv else os.devnull  # rows as they finish; renamed when all are in
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    new = {}
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool, open(part, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames)
        w.writeheader()
        w.writerows(earlier.values())
        for r in pool.map(_job, jobs):
            r.update(fits=r["ok"] and r["shared"] <= r["limit"], triton=triton.__version__, commit=commit)
            new[key(r["kernel"], r["target"], r["dtype"], r["switches"], r["config"])] = r
            w.writerow(r)
            f.flush()
    rows = [new.get(kk) or earlier[kk] for kk in plan]  # in plan order
    if args.csv:
        with open(part, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fieldnames)
            w.writeheader()
            w.writerows(rows)
        os.replace(part, args.csv)
    bad = problems(rows)
    secs = sum(r["seconds"] for r in rows)
    print(f"{len(rows)} compiles (level {args.level}, triton {triton.__version__}, {secs:.0f} s of compile time, "
          f"{args.jobs} jobs): {len(rows) - len(bad)} good, {len(bad)} bad")
    for line in bad:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
