"""Checkpoints: atomic (temp directory, then rename), Hugging Face format, no pickle anywhere.

A resumable checkpoint ``OUTPUT_DIR/checkpoint-<step>/`` holds:

- the model and tokenizer (``save_pretrained``, safetensors): loadable by any HF tool as is;
- ``optimizer.rank<r>.safetensors`` (every optimizer state tensor of rank ``r``) and
  ``optimizer.rank<r>.json`` (its hyper-parameters);
- ``rng.rank<r>.safetensors`` / ``rng.rank<r>.json``: torch (CPU and CUDA), numpy and Python RNGs;
- ``scheduler.json`` and ``trainer_state.json`` (step, data position, algorithm state, solve
  tracker, evaluation before training). ``trainer_state.json`` marks a complete checkpoint.

The directory is renamed into place only when every file is written, so a run killed while saving
leaves the previous checkpoints intact and resumable; leftovers of an interrupted save are hidden
``.checkpoint-*.tmp*`` directories, ignored and removed by the next save.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from fasthint import dist
from fasthint.errors import ConfigError
from fasthint.options import Options, at_least, need, option


@dataclass
class CheckpointConfig(Options):
    """Resumable checkpoints."""

    GROUP = "checkpoints"
    save_steps: int = option(25, "write a resumable checkpoint (model, optimizer, scheduler, RNG, data "
                                 "position, algorithm state) to OUTPUT_DIR/checkpoint-N every N steps "
                                 "(0 = only the final model).")
    save_total_limit: int = option(2, "keep the newest N step checkpoints (0 = all).")
    resume: str = option("auto", "auto = continue from the newest complete checkpoint in output_dir when "
                                 "there is one; a checkpoint-N path = continue from it; none = start fresh "
                                 "(earlier checkpoints and metrics are moved aside, never deleted).")

    def check(self) -> None:
        at_least(self, ("save_steps", "save_total_limit"), 0)
        need(bool(self.resume), "--resume must be auto, none or a checkpoint directory")


CKPT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
_CKPT_RE = re.compile(rf"^{CKPT_PREFIX}(\d+)$")


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)


def save_checkpoint(path: str, model, tokenizer, json_files: Optional[dict] = None,
                    tensor_files: Optional[dict] = None, *, state_dict: Optional[dict] = None) -> str:
    """Writes the HF model and tokenizer plus ``json_files`` (name -> JSON-able object) and
    ``tensor_files`` (name -> {key: tensor}, as safetensors) to ``path`` atomically: a reader, or a
    crash, sees the previous complete directory or the new complete one, never a partial one.
    ``state_dict`` replaces the model's own (a full state dict gathered from FSDP shards)."""
    tmp = _begin(path)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    _write_files(tmp, json_files, tensor_files)
    return _commit(path)


def _tmp(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")


def _begin(path: str) -> str:
    tmp = _tmp(path)
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _write_files(tmp: str, json_files: Optional[dict], tensor_files: Optional[dict]) -> None:
    for name, tensors in (tensor_files or {}).items():
        save_file({k: t.detach().contiguous().cpu().clone() for k, t in tensors.items()}, os.path.join(tmp, name))
    for name, obj in (json_files or {}).items():  # the state file last: it marks completeness
        if name != STATE_FILE:
            _write_json(os.path.join(tmp, name), obj)
    if json_files and STATE_FILE in json_files:
        _write_json(os.path.join(tmp, STATE_FILE), json_files[STATE_FILE])


def _commit(path: str) -> str:
    path = os.path.abspath(path)
    old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(_tmp(path), path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def save_hf_checkpoint(model, tokenizer, path: str, extra_json: Optional[dict] = None,
                       state_dict: Optional[dict] = None) -> str:
    """The final model: HF format plus ``extra_json`` files (e.g. the algorithm's state), atomically."""
    return save_checkpoint(path, model, tokenizer, json_files=extra_json, state_dict=state_dict)


# ---- optimizer, scheduler, RNG as safetensors + JSON ---------------------------------------------

def optimizer_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors, json) of ``optimizer.state_dict()``: tensors keyed ``state.<param>.<name>``."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = v.to_local() if hasattr(v, "to_local") else v
            else:
                scalars[f"{pid}.{name}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_files(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Inverse of :func:`optimizer_files` (FSDP: this rank's shards become DTensors like the params)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict = {}
    for key, t in tensors.items():
        _, pid, name = key.split(".", 2)
        p = params[int(pid)]
        if hasattr(p, "device_mesh") and t.dim() == p.dim():
            t = DTensor.from_local(t.to(p.to_local().device), p.device_mesh, p.placements, run_check=False,
                                   shape=p.shape, stride=p.stride())
        state.setdefault(int(pid), {})[name] = t
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_files() -> tuple[dict, dict]:
    """(tensors, json) holding every RNG the loop draws from: torch CPU/CUDA, numpy, Python."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    meta = {"python": [version, list(internal), py_gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}
    return tensors, meta


def restore_rng(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, py_gauss = meta["python"]
    random.setstate((version, tuple(internal), py_gauss))
    name, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def save_training_checkpoint(path: str, model, tokenizer, optimizer, scheduler, trainer_state: dict, *,
                             state_dict: Optional[dict] = None) -> str:
    """A resumable checkpoint (see the module docstring). Collective over ranks: rank 0 writes the
    model (``state_dict``: the full one gathered from FSDP shards) and the shared files, every rank
    its optimizer shard and RNG states, then rank 0 renames the directory into place."""
    r = dist.rank()
    tmp = _begin(path) if r == 0 else _tmp(path)
    if r == 0:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
    dist.barrier()
    opt_t, opt_j = optimizer_files(optimizer)
    rng_t, rng_j = rng_files()
    _write_files(tmp, {f"optimizer.rank{r}.json": opt_j, f"rng.rank{r}.json": rng_j},
                 {f"optimizer.rank{r}.safetensors": opt_t, f"rng.rank{r}.safetensors": rng_t})
    dist.barrier()
    if r == 0:
        _write_files(tmp, {"scheduler.json": scheduler.state_dict(),
                           STATE_FILE: {**trainer_state, "world_size": dist.world_size()}}, None)
        _commit(path)
    dist.barrier()
    return os.path.abspath(path)


def load_training_checkpoint(path: str, optimizer, scheduler) -> tuple[dict, tuple[dict, dict]]:
    """Restores this rank's optimizer and the scheduler from ``path``; returns (trainer_state, rng)
    where ``rng`` goes to :func:`restore_rng` right before the next step."""
    rank = dist.rank()

    def js(name: str):
        with open(os.path.join(path, name), encoding="utf-8") as fh:
            return json.load(fh)

    saved_world = js(STATE_FILE).get("world_size", 1)
    if saved_world != dist.world_size():
        raise ConfigError(f"{path} was written by {saved_world} processes and this run has {dist.world_size()}: "
                          f"resume with --nproc_per_node {saved_world} (its model directory can start a new run "
                          "at any size)")
    load_optimizer_files(optimizer, load_file(os.path.join(path, f"optimizer.rank{rank}.safetensors")),
                         js(f"optimizer.rank{rank}.json"))
    scheduler.load_state_dict(js("scheduler.json"))
    rng = (load_file(os.path.join(path, f"rng.rank{rank}.safetensors")), js(f"rng.rank{rank}.json"))
    return js(STATE_FILE), rng


# ---- finding, pruning, metrics ---------------------------------------------------------------------

def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (those with ``trainer_state.json``) in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    out = []
    for name in os.listdir(output_dir):
        m = _CKPT_RE.match(name)
        p = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(p, STATE_FILE)):
            out.append((int(m.group(1)), p))
    return sorted(out)


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE_FILE))


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Deletes all but the newest ``keep`` checkpoints (0 keeps all) and leftovers of interrupted saves."""
    for name in os.listdir(output_dir):
        if name.startswith(f".{CKPT_PREFIX}") and (".tmp" in name or ".old" in name):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if keep > 0:
        for _, p in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def truncate_metrics(path: str, last_step: int) -> None:
    """Keeps the rows of ``metrics.jsonl`` up to ``last_step`` (a resumed run rewrites what came
    after its checkpoint); atomic; a torn last line is dropped."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(keep)
    os.replace(tmp, path)


def move_aside(output_dir: str) -> None:
    """A fresh run in a used output directory keeps what is there: metrics.jsonl becomes
    metrics.<time>.jsonl and the step checkpoints move to checkpoints.<time>/ (nothing is lost)."""
    p = os.path.join(output_dir, "metrics.jsonl")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(p) if os.path.isfile(p) else None))
    if os.path.isfile(p):
        os.replace(p, os.path.join(output_dir, f"metrics.{stamp}.jsonl"))
    old = [path for _, path in list_checkpoints(output_dir)]
    if old:
        dest = os.path.join(output_dir, f"checkpoints.{stamp}")
        os.makedirs(dest, exist_ok=True)
        for path in old:
            os.replace(path, os.path.join(dest, os.path.basename(path)))


# options that may differ between a run and its resumption (the others must match)
RESUME_MAY_CHANGE = frozenset({"max_steps", "save_steps", "save_total_limit", "resume", "progress_bar", "report_to",
                               "num_threads", "eval_data", "eval_max_prompts", "eval_samples", "output_dir",
                               "cache_dir", "reward_timeout_s", "generation_batch_size", "micro_batch_size",
                               "vllm_gpu_memory_utilization", "vllm_sleep_mode", "eval_steps",
                               "gradient_checkpointing", "log_completions", "logging_steps", "num_completions_to_print",
                               "eval_data_split", "dist_timeout_minutes", "toy_rebuild"})


def find_resume(cfg) -> Optional[str]:
    """The checkpoint ``cfg.resume`` asks for (None = start fresh). Raises ConfigError for a path
    that is not a complete checkpoint, or a checkpoint whose run had other settings."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        found = list_checkpoints(cfg.output_dir)
        path = found[-1][1] if found else None
    else:
        path = os.path.abspath(os.path.expanduser(cfg.resume))
        if not is_checkpoint(path):
            raise ConfigError(f"--resume {cfg.resume}: not a complete checkpoint (no {STATE_FILE}): pass an "
                              f"OUTPUT_DIR/{CKPT_PREFIX}N directory, auto, or none")
    if path is None:
        return None
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as fh:
        saved = json.load(fh).get("config", {})
    now = vars(cfg)
    diff = [k for k in sorted(saved) if k not in RESUME_MAY_CHANGE and k in now and saved[k] != now[k]]
    if diff:
        shown = ", ".join(f"--{k} {saved[k]!r} -> {now[k]!r}" for k in diff[:3])
        raise ConfigError(f"{path} was written by a run with other settings ({shown}): resume with the same "
                          "settings, or start fresh with --resume none or another --output_dir")
    return path


def write_json_atomic(path: str, obj) -> None:
    """Writes ``obj`` as JSON to ``path`` via a temporary file and a rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)
