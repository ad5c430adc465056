"""Reward worker pool: rule-based reward functions in separate processes with per-response timeouts.

Why processes: math-verify enforces its own timeouts with `signal.alarm`, which only works in a
process's main thread, and a pathological answer (`9^{9^{9^{9^{9}}}}`) or a user's function can
spin in C code where no signal handler ever runs. Each worker runs the functions in its main
thread; the parent hands out one response at a time and kills a worker that overruns its
deadline. Workers are fresh interpreters talking over a socket (spawned, never forked: the
parent may be a torch / gloo / Ray process) that import only this package and the functions.

Reward functions follow the seam `(response_text, gold_answer, sample_meta) -> {name: score}`
(a bare number is also accepted; its name is the function's name) and are named by
`"module:function"` strings, so a worker can import them.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
import pickle
import pkgutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from eureka_megatron.config.sections import DEFAULT_REWARD
from eureka_megatron.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = {"accuracy": 1.0, "format": 0.5}  # MM-Eureka: r = r_acc + 0.5 * r_format
COUNTERS = ("reward/timeouts", "reward/errors", "reward/worker_restarts")
MAX_ATTEMPTS = 2  # a sample whose worker died is retried once on a fresh worker


@dataclass
class RewardResult:
    """Per-sample rewards in input order; `counters` count this batch's failures."""
    total: list[float]
    scores: dict[str, list[float]]
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))


class RewardFunctionError(UserError, ValueError):
    """A reward function spec that does not resolve: bad form, missing module or attribute."""


def resolve_function(spec: str) -> tuple[str, Callable]:
    """`"pkg.module:attr[.attr]"` -> (score name for a bare-number result, callable); raises a
    RewardFunctionError naming `spec` for every way it can be wrong, so a config typo fails at
    start-up."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise RewardFunctionError(f"reward function {spec!r}: expected 'module:function'")
    module_name, attr_path = spec.split(":")
    try:
        obj = pkgutil.resolve_name(spec)
    except Exception as e:  # noqa: BLE001 -- any import-time failure of a user's module too
        if isinstance(e, ModuleNotFoundError) and (  # the module itself, or its package
                e.name == module_name or module_name.startswith(f"{e.name}.")):
            why = f"module {module_name!r} not found"
        elif isinstance(e, AttributeError) and module_name in sys.modules:  # imported fine
            why = f"{module_name!r} has no attribute {attr_path!r}"
        else:
            why = f"importing {module_name!r} failed: {type(e).__name__}: {e}"
        raise RewardFunctionError(f"reward function {spec!r}: {why}") from e
    if not callable(obj):
        raise RewardFunctionError(f"reward function {spec!r}: {attr_path!r} is not callable "
                                  f"({type(obj).__name__})")
    return attr_path.split(".")[-1], obj


def _named_scores(name: str, out: Any) -> dict[str, float]:
    """A function's result as {score name: float}; anything else is the function's error."""
    if isinstance(out, dict):
        items = out.items()
    elif isinstance(out, numbers.Real):  # bool and numpy scalars included
        items = [(name, out)]
    else:
        raise TypeError(f"{name} returned {type(out).__name__}; expected a dict of scores or a number")
    scores = {}
    for k, v in items:
        if not isinstance(k, str) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} returned score {k!r}: {v!r}; expected str -> number")
        scores[k] = float(v)
    return scores


def _worker_main(conn, functions: list[str]) -> None:
    """Worker loop: resolve the functions, say ready, then score one task per message.

    The functions run in this process's main thread, so their own signal.alarm timeouts work."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        fns = [resolve_function(f) for f in functions]
    except BaseException:  # noqa: BLE001 -- reported to the parent, which raises
        conn.send(("init_error", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, response, answer, meta = msg
        per_function: list[dict[str, float]] = []
        error = None
        for name, fn in fns:
            try:
                per_function.append(_named_scores(name, fn(response, answer, meta)))
            except Exception as e:  # noqa: BLE001 -- one sample's failure, scored 0 by the parent
                error = f"{name}: {type(e).__name__}: {e}"
                break
        conn.send((task_id, per_function, error))


# The worker's first lines: stdlib only, so nothing of the parent's __main__ is re-imported (as
# multiprocessing's spawn would do -- a guard-less script, or a Ray / torchrun entry that imports
# torch, in every worker). The parent sends its sys.path and the function strings first.
_BOOTSTRAP = ("import sys; from multiprocessing.connection import Connection; "
              "c = Connection(int(sys.argv[1])); sys.path[:] = c.recv(); "
              "from eureka_megatron.rewards.pool import _worker_main; _worker_main(c, c.recv())")


class _Worker:
    """One worker process (a fresh interpreter: never a fork of the parent), its socket, and the
    sample it is running (if any)."""

    def __init__(self, functions: list[str], start_timeout: float):
        self.conn, child = _socket_pair()
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, str(child.fileno())],
                                         pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            child.close()
        self.sentinel = None  # pidfd: readable at exit, even if the socket leaked to a grandchild
        try:
            self.sentinel = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: the socket's EOF is the signal
            pass
        try:
            self.conn.send(list(sys.path))
            self.conn.send(functions)
        except OSError:
            pass  # died at once: reported as a start-up failure
        self.ready = False
        self.start_deadline = time.monotonic() + start_timeout
        self.task: int | None = None  # sample index in flight
        self.task_id = -1
        self.deadline = math.inf

    @property
    def waitables(self) -> list:
        return [self.conn] if self.sentinel is None else [self.conn, self.sentinel]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exitcode(self) -> int | None:
        try:
            return self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, graceful: bool = False) -> None:
        """End the process for sure (SIGTERM, then SIGKILL), reap it, close the fds."""
        if graceful and self.ready and self.task is None and self.alive():
            try:
                self.conn.send(None)
                self.proc.wait(1.0)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(0.5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.conn.close()
        if self.sentinel is not None:
            os.close(self.sentinel)
            self.sentinel = None


def _socket_pair():
    """A connected pair of multiprocessing Connections over a Unix socket."""
    a, b = socket.socketpair()
    return Connection(a.detach()), Connection(b.detach())


def _stop_all(workers: list[_Worker]) -> None:
    """Finalizer / close(): stop every worker; shared by reference so it sees replacements."""
    while workers:
        workers.pop().stop(graceful=True)


class RewardPool:
    """Score responses with `functions` in `num_workers` processes; total = sum(weight * score).

    A response that takes longer than `timeout` seconds scores 0 for every score name (counted in
    `reward/timeouts`) and its worker is replaced; a worker that dies has its sample retried once
    on a fresh worker (then 0, counted in `reward/errors`); a function that raises scores its
    sample 0 (`reward/errors`). Scores without a weight are returned with weight 0.
    One caller at a time: `score` is not thread-safe.

    `memoize` (default on): rule-based rewards are pure functions of (response, gold, meta), and
    RL batches repeat the same response to the same question many times (a converged group is n
    copies), so each distinct triple is scored once and remembered (at most `memo_size` triples;
    timeouts and errors are never remembered). Turn it off for a stochastic judge.
    """

    def __init__(self, functions: list[str] | tuple[str, ...] = (DEFAULT_REWARD,),
                 weights: dict[str, float] | None = None, num_workers: int = 2,
                 timeout: float = 5.0, start_timeout: float = 120.0, memoize: bool = True,
                 memo_size: int = 1 << 16):
        functions = [functions] if isinstance(functions, str) else list(functions)
        if not functions:
            raise ValueError("RewardPool needs at least one reward function")
        if len(set(functions)) != len(functions):
            raise ValueError(f"reward functions listed twice: {functions}")
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
        if not timeout > 0 or not start_timeout > 0:
            raise ValueError(f"timeout and start_timeout must be > 0, got {timeout}, {start_timeout}")
        weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        for k, v in weights.items():
            if not isinstance(k, str) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"reward weight {k!r}: {v!r} must be a finite number")
        self.functions = functions
        self.weights = {k: float(v) for k, v in weights.items()}
        for spec in functions:  # fail here, in the parent, with the offending string
            resolve_function(spec)
        self.num_workers = num_workers
        self.timeout = float(timeout)
        self.start_timeout = float(start_timeout)
        self.names: list[str] = []  # score names seen so far, in first-seen order
        self._weights_checked = False
        self._workers: list[_Worker] = []
        self._next_task_id = 0
        self.totals = dict.fromkeys(COUNTERS, 0)  # over the pool's lifetime
        self.memo: dict[tuple, dict[str, float]] | None = {} if memoize else None
        self.memo_size = memo_size
        self._timed_out: set[int] = set()  # this batch's samples that timed out
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)
        try:
            self._fill()
            self._await_ready()
        except BaseException:
            self.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop all workers (idempotent; also runs at garbage collection and interpreter exit)."""
        self._finalizer()

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def _fill(self) -> int:
        """Start workers until there are num_workers (in parallel; they get ready on their own)."""
        if not self._finalizer.alive:
            raise RuntimeError("RewardPool is closed")
        started = 0
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self.functions, self.start_timeout))
            started += 1
        return started

    def _await_ready(self) -> None:
        while not all(w.ready for w in self._workers):
            starting = [w for w in self._workers if not w.ready]
            self._poll_starting(starting, wait([x for w in starting for x in w.waitables],
                                               timeout=self._wait_time(starting)))

    def _wait_time(self, workers: list[_Worker]) -> float:
        deadlines = [w.deadline if w.ready else w.start_deadline for w in workers]
        return max(0.0, min(deadlines, default=math.inf) - time.monotonic()) if workers else 0.0

    def _poll_starting(self, starting: list[_Worker], ready: list) -> None:
        """Turn a started worker ready, or raise: a worker that cannot start is a setup error."""
        for w in starting:
            msg = None
            if w.conn in ready or w.conn.poll():
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    msg = ("init_error", f"worker exited with code {w.exitcode()} during start-up")
            elif not w.alive():
                msg = ("init_error", f"worker exited with code {w.exitcode()} during start-up")
            elif time.monotonic() > w.start_deadline:
                msg = ("init_error", f"worker not ready after {self.start_timeout:.0f} s")
            if msg is None:
                continue
            if msg[0] == "ready":
                w.ready = True
            else:
                self._workers.remove(w)
                w.stop()
                raise RuntimeError(f"reward worker failed to start ({self.functions}):\n{msg[1]}")

    def _replace(self, w: _Worker, counters: dict[str, int]) -> None:
        self._workers.remove(w)
        w.stop()
        counters["reward/worker_restarts"] += 1
        self._fill()

    # -- scoring -----------------------------------------------------------------------------
    def score(self, responses: list[str], answers: list[str],
              metas: list[dict] | None = None) -> RewardResult:
        """Score every response against its gold answer; results are in input order."""
        n = len(responses)
        if len(answers) != n or (metas is not None and len(metas) != n):
            raise ValueError(f"score: {n} responses, {len(answers)} answers"
                             + ("" if metas is None else f", {len(metas)} metas")
                             + " (must be equal)")
        metas = [None] * n if metas is None else list(metas)
        counters = dict.fromkeys(COUNTERS, 0)
        counters["reward/worker_restarts"] += self._fill()  # replace any lost since the last call
        results: list[dict[str, float] | None] = [None] * n
        errors: list[tuple[int, str]] = []
        attempts = [0] * n
        self._timed_out = set()
        keys = [self._key(*x) for x in zip(responses, answers, metas)]
        first: dict[tuple, int] = {}  # each distinct triple is sent once; copies take its result
        for i, key in enumerate(keys):
            if key is None:
                continue
            if key in self.memo:
                results[i] = self.memo[key]
            else:
                first.setdefault(key, i)
        pending = deque(i for i in range(n) if results[i] is None
                        and (keys[i] is None or first[keys[i]] == i))
        try:
            while pending or any(w.task is not None for w in self._workers):
                self._dispatch(pending, responses, answers, metas, attempts, counters)
                busy = [w for w in self._workers if w.task is not None or not w.ready]
                ready = wait([x for w in busy for x in w.waitables],
                             timeout=self._wait_time(busy))
                self._poll_starting([w for w in busy if not w.ready], ready)
                for w in [w for w in busy if w.ready and w.task is not None]:
                    self._collect(w, ready, pending, results, errors, attempts, counters)
        except BaseException:
            for w in [w for w in self._workers if w.task is not None]:
                self._workers.remove(w)  # its late answer must never reach another batch
                w.stop()
            raise
        return self._finish(self._fill_copies(keys, first, results, errors, counters),
                            errors, counters)

    def _fill_copies(self, keys, first, results, errors, counters):
        """Copies of a triple take its result (and its timeout or error, counted per sample);
        triples scored cleanly are remembered for later batches."""
        failed = dict(errors)
        for i, key in enumerate(keys):
            if key is None:
                continue
            j = first.get(key, i)
            if results[i] is None:  # a copy of a triple scored in this batch
                results[i] = results[j]
                if j in failed:
                    errors.append((i, failed[j]))
                    counters["reward/errors"] += 1
                elif j in self._timed_out:
                    counters["reward/timeouts"] += 1
            elif j == i and key not in self.memo and i not in failed \
                    and i not in self._timed_out and len(self.memo) < self.memo_size:
                self.memo[key] = results[i]
        return results

    def _key(self, response, answer, meta) -> tuple | None:
        """The memo key of one sample, None when memoizing is off or the meta cannot pickle."""
        if self.memo is None:
            return None
        try:
            return response, answer, pickle.dumps(meta, protocol=4)
        except Exception:  # noqa: BLE001 -- such a sample is simply scored every time
            return None

    def _dispatch(self, pending, responses, answers, metas, attempts, counters) -> None:
        for w in list(self._workers):
            if not pending or not w.ready or w.task is not None:
                continue
            if not w.alive():  # died while idle
                self._replace(w, counters)
                continue
            i = pending.popleft()
            self._next_task_id += 1
            w.task, w.task_id = i, self._next_task_id
            try:
                w.conn.send((w.task_id, responses[i], answers[i], metas[i]))
            except OSError:
                pass  # the dead worker is noticed by _collect, which retries the sample
            except Exception as e:  # noqa: BLE001 -- pickling: nothing was written
                w.task = None
                raise TypeError(f"reward sample {i} cannot be sent to a worker (responses, answers "
                                f"and metas must pickle): {type(e).__name__}: {e}") from e
            w.deadline = time.monotonic() + self.timeout

    def _collect(self, w: _Worker, ready, pending, results, errors, attempts, counters) -> None:
        i = w.task
        if w.conn in ready or w.conn.poll():
            try:
                task_id, per_function, error = w.conn.recv()
            except (EOFError, OSError):
                pass  # died mid-reply: a crash
            else:
                if task_id != w.task_id:
                    raise RuntimeError(f"reward worker answered task {task_id}, expected {w.task_id}")
                w.task, w.deadline = None, math.inf
                if error is None:
                    results[i] = self._merge(per_function)
                else:
                    results[i] = {}
                    errors.append((i, error))
                    counters["reward/errors"] += 1
                return
        elif w.alive():
            if time.monotonic() < w.deadline:
                return
            results[i] = {}
            counters["reward/timeouts"] += 1
            self._timed_out.add(i)
            w.task = None
            self._replace(w, counters)
            return
        # the worker died with sample i in flight
        attempts[i] += 1
        exitcode = w.exitcode()
        w.task = None
        self._replace(w, counters)
        if attempts[i] < MAX_ATTEMPTS:
            pending.appendleft(i)
        else:
            results[i] = {}
            errors.append((i, f"worker died (exit code {exitcode}) on {attempts[i]} attempts"))
            counters["reward/errors"] += 1

    def _merge(self, per_function: list[dict[str, float]]) -> dict[str, float]:
        """One sample's scores from all functions; learns the score names and checks the weights
        against them on the first result (config errors raise: they would corrupt every batch)."""
        scores: dict[str, float] = {}
        for spec, part in zip(self.functions, per_function):
            for k, v in part.items():
                if k in scores:
                    raise ValueError(f"score {k!r} is produced by more than one reward function "
                                     f"(again by {spec!r}); functions: {self.functions}")
                scores[k] = v
        for k in scores:
            if k not in self.names:
                self.names.append(k)
        if not self._weights_checked:
            unknown = [k for k in self.weights if k not in self.names]
            if unknown:
                raise ValueError(f"reward weights {unknown} name no score; the functions "
                                 f"{self.functions} produce {self.names}")
            self._weights_checked = True
        return scores

    def _finish(self, results, errors, counters) -> RewardResult:
        names = self.names + [k for k in self.weights if k not in self.names]  # always reported
        scores = {k: [float(r.get(k, 0.0)) for r in results] for k in names}
        total = [sum(self.weights.get(k, 0.0) * r.get(k, 0.0) for k in names) for r in results]
        for k, v in counters.items():
            self.totals[k] += v
        if errors or counters["reward/timeouts"]:
            first = f"; sample {errors[0][0]}: {errors[0][1]}" if errors else ""
            log.warning("rewards: %d of %d samples scored 0 (%d timed out after %.1f s, %d errors)%s",
                        len(errors) + counters["reward/timeouts"], len(results),
                        counters["reward/timeouts"], self.timeout, len(errors), first)
        return RewardResult(total=total, scores=scores, counters=counters)
