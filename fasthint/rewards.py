"""Verifiable math rewards: last-``\\boxed{}`` extraction and math-verify equivalence.

``math_reward(completion, gold)`` returns 1.0 when the last boxed answer of the
completion is mathematically equivalent to ``gold`` and 0.0 otherwise.  Plain
integers/decimals are compared exactly in-process; everything else goes to
math-verify in a small pool of worker processes (fresh interpreters).  The
parent enforces a per-item deadline (no SIGALRM, so any thread may call it): a
worker that overruns is killed, the item scores 0.0 and a fresh worker is
started lazily when needed.  No process is started at import time.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import re
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from decimal import Decimal
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any, Callable

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

__all__ = ["last_boxed", "math_reward", "check_gold", "RewardScorer"]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_NUM_RE = re.compile(r"^-?\d+(\.\d+)?$")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{..}`` / ``\\fbox{..}`` / ``\\boxed X`` in ``text``.

    Braces are balanced; an unterminated last box gives None, as does no box.
    """
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    pos = matches[-1].end()
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos >= len(text):
        return None
    if text[pos] != "{":
        if pos == matches[-1].end() or matches[-1].group() != "\\boxed":
            return None
        return re.match(r"[^\s$]+", text[pos:]).group()  # type: ignore[union-attr]
    depth, start = 0, pos + 1
    for i in range(pos, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def _strip(s: str) -> str:
    return s.strip().strip("$").strip()


def _fast_compare(pred: str, gold: str) -> float | None:
    """Exact comparison when both are plain integers/decimals, else None."""
    p, g = _strip(pred), _strip(gold)
    if _NUM_RE.match(p) and _NUM_RE.match(g):
        return float(Decimal(p) == Decimal(g))
    return None


def _configs() -> list[Any]:
    return [LatexExtractionConfig(), ExprExtractionConfig()]


def verify_answer(pred: str, gold: str) -> float:
    """math-verify equivalence of two bare answers, without internal timeouts.

    Meant to run inside a worker process (the parent enforces the deadline).
    """
    cfg = _configs()
    gold_parsed = parse("\\boxed{" + gold + "}", cfg, parsing_timeout=None)  # type: ignore[arg-type]
    pred_parsed = parse("\\boxed{" + pred + "}", cfg, parsing_timeout=None)  # type: ignore[arg-type]
    if not gold_parsed or not pred_parsed:
        return 0.0
    return float(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _serve(fd: int) -> None:
    """Worker loop (fresh interpreter): warm up, say ready, answer ``(pred, gold)``."""
    conn = Connection(fd)
    sys_path, fn_bytes = conn.recv()
    sys.path[:] = sys_path
    worker_fn = pickle.loads(fn_bytes)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    try:
        verify_answer("1", "1")  # import sympy/math-verify before accepting work
    except Exception:
        pass
    conn.send("ready")
    while True:
        try:
            pred, gold = conn.recv()
        except (EOFError, OSError):
            return
        try:
            value = worker_fn(pred, gold)
            value = None if value is None else float(value)
        except BaseException as e:  # reported to the parent, which decides (math: 0.0; a plug-in: an error)
            value = ("error", f"{type(e).__name__}: {str(e).strip()[:200]}")
        conn.send(value)


_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from fasthint.rewards import _serve; _serve(int(sys.argv[2]))"


class _Worker:
    """One worker interpreter plus the parent's end of its pipe.

    A plain subprocess (not multiprocessing's spawn) so the caller's ``__main__``
    is never re-imported; its own session keeps Ctrl-C from reaching it.
    """

    def __init__(self, fn_bytes: bytes, start_timeout_s: float) -> None:
        self.conn, child = Pipe()
        self.ready = False
        self.item: int | None = None  # index of the item being scored
        self.deadline = time.monotonic() + start_timeout_s
        try:
            argv = [sys.executable, "-c", _BOOT, _PKG_ROOT, str(child.fileno())]
            self.proc = subprocess.Popen(argv, pass_fds=(child.fileno(),), start_new_session=True)
        except BaseException:
            self.conn.close()
            raise
        finally:
            child.close()
        try:
            self.conn.send(([os.path.abspath(p) for p in sys.path], fn_bytes))
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=2.0)
        except Exception:
            pass
        self.conn.close()


class RewardScorer:
    """Batch math reward with a hard per-item deadline and process isolation.

    ``worker_fn(pred, gold) -> float`` must be an importable top-level function
    (pickled by reference into the workers); it defaults to :func:`verify_answer`.
    ``start_timeout_s`` bounds a worker's start-up (interpreter + sympy import).
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        num_workers: int = 1,
        worker_fn: Callable[[str, str], float] = verify_answer,
        start_timeout_s: float = 60.0,
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.num_workers = max(1, int(num_workers))
        self.start_timeout_s = float(start_timeout_s)
        self._fn_bytes = pickle.dumps(worker_fn)  # fails early if not importable by reference
        self._workers: list[_Worker] = []
        self._pid = os.getpid()
        self._lock = threading.Lock()
        _scorers.add(self)

    def score(self, completions: list[str], golds: list[str]) -> list[float]:
        """Rewards (1.0 / 0.0) for each completion against its gold, in order."""
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions vs {len(golds)} golds")
        results = [0.0] * len(completions)
        pending: deque[tuple[int, str, str]] = deque()
        for i, (completion, gold) in enumerate(zip(completions, golds)):
            pred = last_boxed(completion)
            if pred is None or not pred.strip():
                continue
            fast = _fast_compare(pred, gold)
            if fast is not None:
                results[i] = fast
            else:
                pending.append((i, _strip(pred), _strip(gold)))
        if pending:
            self._score_pending(pending, results)
        return [r if isinstance(r, float) else 0.0 for r in results]  # a failed check scores 0

    def call(self, items: list[tuple[Any, Any]]) -> list[Any]:
        """``worker_fn(a, b)`` for each item in the workers, each within the deadline: a float, None,
        ``("error", message)`` when it raised, or 0.0 when it overran (the worker is replaced)."""
        results: list[Any] = [0.0] * len(items)
        pending = deque((i, a, b) for i, (a, b) in enumerate(items))
        if pending:
            self._score_pending(pending, results)
        return results

    def _score_pending(self, pending: deque, results: list) -> None:
        with self._lock:
            try:
                self._run(pending, results)
            except BaseException:  # e.g. KeyboardInterrupt: never leave a worker mid-item
                for w in [w for w in self._workers if w.item is not None or not w.ready]:
                    self._drop(w)
                raise

    def _run(self, pending: deque, results: list) -> None:
        if os.getpid() != self._pid:  # forked copy: those workers are not ours
            self._workers, self._pid = [], os.getpid()
        may_start, starts_left = True, self.num_workers + len(pending)  # bounds restarts per batch
        while True:
            while may_start and len(self._workers) < min(self.num_workers, len(pending) + self._busy()):
                starts_left -= 1
                may_start = starts_left > 0
                try:
                    self._workers.append(_Worker(self._fn_bytes, self.start_timeout_s))
                except Exception:
                    may_start = False
            now = time.monotonic()
            for w in list(self._workers):
                if w.ready and w.item is None and pending:
                    if w.proc.poll() is not None:  # died while idle: replace, keep the item
                        self._drop(w)
                        continue
                    idx, pred, gold = pending[0]
                    try:
                        w.conn.send((pred, gold))
                        pending.popleft()
                        w.item, w.deadline = idx, now + self.timeout_s
                    except Exception:
                        self._drop(w)
            if not self._workers and pending and may_start:
                continue  # an idle worker had died: start another
            if self._busy() == 0 and (not pending or not self._workers):
                return  # all done, or no worker could be started: the rest stay 0.0
            waiting = [w for w in self._workers if w.item is not None or not w.ready]
            timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            ready = set(wait([w.conn for w in waiting], timeout=timeout))
            for w in waiting:
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except Exception:
                        may_start = may_start and w.ready
                        self._drop(w)
                        continue
                    if msg == "ready":
                        w.ready = True
                    else:
                        results[w.item] = msg  # type: ignore[index]
                        w.item = None
                elif time.monotonic() >= w.deadline:
                    may_start = may_start and w.ready  # a start that timed out: give up this batch
                    self._drop(w)

    def _busy(self) -> int:
        return sum(1 for w in self._workers if w.item is not None)

    def _drop(self, w: _Worker) -> None:
        w.kill()
        self._workers.remove(w)

    def close(self) -> None:
        """Kill all worker processes (they restart lazily if used again)."""
        with self._lock:
            for w in list(self._workers):
                self._drop(w)


_default: RewardScorer | None = None
_default_lock = threading.Lock()
_scorers: weakref.WeakSet[RewardScorer] = weakref.WeakSet()


def _default_scorer() -> RewardScorer:
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = RewardScorer()
    return _default


@atexit.register
def _close_all() -> None:
    for scorer in list(_scorers):
        scorer.close()


def math_reward(completion: str, gold: str) -> float:
    """1.0 if the last boxed answer in ``completion`` equals ``gold``, else 0.0."""
    try:
        return _default_scorer().score([completion], [gold])[0]
    except Exception:
        return 0.0


def check_gold(gold: str) -> str | None:
    """None if ``gold`` is a usable answer, else a short description of the problem."""
    g = _strip(gold)
    if not g:
        return "empty gold answer"
    if _NUM_RE.match(g):
        return None
    if last_boxed("\\boxed{" + g + "}") != g:
        return f"unbalanced braces in gold answer {gold!r}"
    try:
        main = threading.current_thread() is threading.main_thread()
        kw: dict[str, Any] = {} if main else {"parsing_timeout": None}
        parsed = parse("\\boxed{" + g + "}", _configs(), **kw)
    except Exception as e:
        return f"math-verify failed on gold answer {gold!r}: {type(e).__name__}"
    if not any(not isinstance(p, str) for p in parsed):
        return f"math-verify could not parse gold answer {gold!r}"
    return None
