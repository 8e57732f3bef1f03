"""One model's session fed from every job at once (issue 16: batch across jobs that share a model).

A :class:`SessionBatcher` stands in front of one session (a :class:`~node.inference.runtime.ModelSession`
or a Triton session: anything with ``run(batch, outputs)`` and ``max_batch``). Callers
:meth:`~SessionBatcher.submit` batches and get a future; one thread runs them in arrival order,
and merges requests waiting for the same outputs over inputs of the same shape into one run of at
most ``max_batch`` rows. So two jobs of one model (two runner workers, the inference API) share
each run instead of contending for the cores in two runs, and a job can hand in its first images
while the rest are still being decoded (:func:`node.runner.analyse.prepare_and_infer`).

A request of more than ``max_batch`` rows runs alone (the session cuts it in chunks). A failed
run fails every request it carried with the session's error (an InferenceError).

A batch may be a device array (CuPy, from GPU preparation: anything with
``__cuda_array_interface__``): it stays on the device, requests merge only with others on the
same device, and they are concatenated with the arrays' own library (``cupy.concatenate``).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from node.inference.device_arrays import concatenate, is_device_array
from node.inference.runtime import CPU

#: seconds the thread waits for work before it ends (a later submit starts another)
_IDLE_S = 60.0


class RunsBatches(Protocol):
    """What the analysis needs of a session: run a batch, the largest batch it runs at once."""

    max_batch: int

    def run(self, batch: Any, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The named outputs (None: the session's own) of ``batch`` (a numpy or a device
        array), concatenated along N."""
        ...


def _device(batch: Any) -> tuple[str, int | None]:
    """Where ``batch`` lives: ("cpu", None), or ("cuda", its GPU when the array says)."""
    if not is_device_array(batch):
        return ("cpu", None)
    gpu = getattr(getattr(batch, "device", None), "id", None)
    return ("cuda", gpu if isinstance(gpu, int) else None)


@dataclass(eq=False)
class _Request:
    batch: Any  # a numpy array or a device array
    outputs: tuple[str, ...] | None
    future: Future[dict[str, np.ndarray]] = field(default_factory=Future)

    @property
    def key(self) -> tuple[Any, ...]:
        """Requests merge only with the same key: row shape, dtype, outputs, device."""
        shape = tuple(int(d) for d in self.batch.shape[1:])
        return (shape, np.dtype(self.batch.dtype).str, self.outputs, _device(self.batch))

    @property
    def rows(self) -> int:
        return int(self.batch.shape[0])


class SessionBatcher:
    """Runs ``session`` from one thread, merging waiting requests (see the module text).

    ``run`` has the session's signature, so a batcher can stand wherever the session did;
    other attributes (``active_provider``, ``input_dtype``, ...) are the session's.
    ``runs`` and ``merged`` count the runs made and the requests that shared a run with an
    earlier one (for tests and the bench)."""

    def __init__(self, session: RunsBatches, name: str = "model") -> None:
        self.session = session
        self.name = name
        self.max_batch = int(session.max_batch)
        self.runs = 0
        self.merged = 0
        self._queue: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def eager(self) -> bool:
        """True when the model runs off this machine's cores (a GPU, a Triton server): then a
        job hands in its images as soon as the model is free, since preparing the next ones
        costs the model nothing. On the CPU provider the model and the preparation share the
        cores, so a job hands in full batches (and the rest at the end): small runs would only
        add their fixed cost."""
        return str(getattr(self.session, "active_provider", CPU)) != CPU

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):  # not set up yet (unpickling, a failed __init__): no recursion
            raise AttributeError(attr)
        return getattr(self.session, attr)

    def submit(self, batch: Any, outputs: Sequence[str] | None = None) -> Future[dict[str, np.ndarray]]:
        """Queue ``batch`` (N, ...), a numpy or a device array, for the model; the future's
        result is what ``session.run`` would have returned for it alone."""
        array = batch if is_device_array(batch) else np.asarray(batch)
        request = _Request(array, None if outputs is None else tuple(outputs))
        if request.batch.ndim < 1 or request.rows == 0:
            raise ValueError(f"model {self.name}: empty batch (shape {tuple(request.batch.shape)})")
        with self._cond:
            if self._closed:
                raise RuntimeError(f"model {self.name}: the batcher is closed")
            self._queue.append(request)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name=f"pacs-node-infer-{self.name}", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return request.future

    def run(self, batch: Any, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """:meth:`submit` and wait for the result (raises the session's error)."""
        return self.submit(batch, outputs).result()

    def close(self) -> None:
        """Run what is queued, then end the thread; later submits are refused."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _take(self) -> list[_Request] | None:
        """The next run's requests: the oldest, and the later ones that fit beside it."""
        with self._cond:
            while not self._queue:
                if self._closed or not self._cond.wait(timeout=_IDLE_S) and not self._queue:
                    self._thread = None  # idle: the next submit starts a thread again
                    return None
            first = self._queue.popleft()
            group, rows = [first], first.rows
            if rows < self.max_batch:
                for request in list(self._queue):
                    if request.key == first.key and rows + request.rows <= self.max_batch:
                        self._queue.remove(request)
                        group.append(request)
                        rows += request.rows
                        if rows == self.max_batch:
                            break
            return group

    def _loop(self) -> None:
        while (group := self._take()) is not None:
            group = [r for r in group if r.future.set_running_or_notify_cancel()]  # not cancelled
            if not group:
                continue
            self.runs += 1
            self.merged += len(group) - 1
            try:
                batch = group[0].batch if len(group) == 1 else concatenate([r.batch for r in group])
                out = self.session.run(batch, group[0].outputs)
            except BaseException as exc:  # the session's error goes to every caller it carried
                for r in group:
                    r.future.set_exception(exc)
                continue
            start = 0
            for r in group:
                r.future.set_result({name: value[start : start + r.rows] for name, value in out.items()})
                start += r.rows
