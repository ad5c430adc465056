"""An engine's own streaming `update_weights`, run in a thread and fed one bucket at a time.

Both fan-outs of a weight sync hand buckets over this way: `EngineGroup` feeds every engine of a
group from one read of the trainer's stream, and a Ray `EngineActor` feeds its engine the buckets
as they arrive, one actor call each. The engine's checks apply unchanged, it holds one bucket at
a time, and a stream that fails half-way makes its `update_weights` raise `SyncAborted` (its
version becomes None): one exception for an aborted sync, wherever the engine runs.
"""
from __future__ import annotations

import queue
import threading
from typing import Any

_END, _ABORT = object(), object()


class SyncAborted(RuntimeError):
    """An engine's weight sync was stopped half-way because the bucket stream feeding it failed."""


class BucketFeed:
    """`engine.update_weights(<the buckets put here>, version, **kwargs)` in a daemon thread.

    `ready()` blocks until the engine asks for its next bucket (True) or its update has ended
    (False); `put` hands it one; `end()` closes the stream (`abort=True`: the engine sees
    SyncAborted); `wait()` joins the thread and says how the update ended."""

    def __init__(self, engine, version: int, *, name: str, **kwargs: Any):
        self._inbox: queue.Queue = queue.Queue()
        self._asks: queue.Queue = queue.Queue()
        self._asking: bool | None = None  # None: not known since the last put
        self._error: BaseException | None = None
        self._ended_early = False
        self.buckets = 0
        self._thread = threading.Thread(target=self._run, args=(engine, version, kwargs),
                                        daemon=True, name=name)
        self._thread.start()

    def _stream(self):
        while True:
            self._asks.put(True)
            item = self._inbox.get()
            if item is _END:
                return
            if item is _ABORT:
                raise SyncAborted("weight sync aborted: the bucket stream failed")
            yield item
            item = None  # the engine holds the bucket now, not this frame

    def _run(self, engine, version, kwargs):
        stream = self._stream()
        try:
            engine.update_weights(stream, version, **kwargs)
            if stream.gi_frame is not None:  # returned without asking for the end of the stream
                self._ended_early = True
        except BaseException as e:  # noqa: BLE001 -- reported by wait()
            self._error = e
        finally:
            self._asks.put(False)

    def ready(self) -> bool:
        if self._asking is None:
            self._asking = self._asks.get()
        return self._asking

    def put(self, bucket) -> None:
        """Hand the engine `bucket`; only after `ready()` said it asks for one."""
        self._asking = None
        self.buckets += 1
        self._inbox.put(bucket)

    def push(self, bucket) -> None:
        """`put` for a caller feeding one engine: returns once the engine has taken the bucket
        and asked for the next one; raises what ended its update instead."""
        if self.ready():
            self.put(bucket)
        if not self.ready():
            raise self.wait() or RuntimeError("the engine's update_weights ended")

    def end(self, abort: bool = False) -> None:
        self._inbox.put(_ABORT if abort else _END)

    def wait(self, timeout: float | None = None) -> BaseException | None:
        """Join the thread: the update's error (a RuntimeError if it returned before the last
        bucket), None if it read the whole stream."""
        self._thread.join(timeout)
        if self._error is not None:
            return self._error
        if self._ended_early:
            return RuntimeError("its update_weights returned before the last bucket")
        return None
