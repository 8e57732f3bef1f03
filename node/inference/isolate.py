"""Decoding and preparation in child processes under a memory and a time limit, so that one
instance cannot take the node down (issue 21).

The budget checks in :mod:`node.inference.decode` refuse what the headers claim; this is the second
line of defence for what they do not reveal (a decoder bug, a huge LUT, an allocation inside a
codec). A :class:`PreparePool` keeps a few warm children (pydicom, numpy and OpenCV imported once,
by the ``forkserver`` they are forked from: never a fork of the threaded node). Each child runs
under ``RLIMIT_AS`` = its own size once warm + ``limits.decode_memory_mib``. A job's instances go
in short runs to every free child (:meth:`PreparePool.stream`: one job uses all the cores, and
its first images come back while the others are decoded); the prepared arrays come back through
shared memory: one file of /dev/shm per instance, written by the child, mapped copy-on-write by
the parent and its name removed at once (the arrays are views of the child's pages: no copy, no
resource tracker), the data sets and headers pickled.

A child that runs out of its memory (MemoryError), is killed by a signal (the kernel's OOM killer,
a crash in a codec) or passes ``limits.decode_timeout_s`` is replaced, and the submit raises
:class:`PreparationFailed` (a DecodeError: the job fails permanently) saying which. The node keeps
serving. The time limit counts the CPU time a child spends on the submit, not the time it waits
for a core: the children run at a lower priority (``limits.prepare_niceness``), so that a model
running on the same cores is not slowed down by them, and a node busy with its models must not
fail images for that. A child that neither works nor answers is ended after
:data:`_WALL_FACTOR` times the limit.

The interface is generic (items, a picklable :class:`~node.inference.prepared.PrepareSpec`, a
budget -> prepared frames), so that a pool of such processes can feed batches to one ONNX session.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import itertools
import logging
import mmap
import multiprocessing
import os
import pickle
import queue
import resource
import signal
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from typing import Literal

import numpy as np

from node.budget import DEFAULT_BUDGET, MIB, Budget
from node.errors import DecodeError, NodeError, PreprocessError
from node.inference.prepared import DisplaySpec, Item, PreparedFrame, PrepareSpec
from node.redact import redact_library_logs
from node.types import ModelInput

log = logging.getLogger(__name__)

#: what the forkserver imports once, so that every child starts warm
_PRELOAD = ["node.inference.prepared", "node.inference.isolate"]
_ALIGN = 64
_START_TIMEOUT_S = 60.0
_SHM_DIR = "/dev/shm"
_M_ARENA_MAX = -8  # glibc mallopt parameters
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
#: a submit whose children have not finished after this many times ``timeout_s`` of wall-clock
#: time fails, whatever CPU they used (a child blocked on something, not working)
_WALL_FACTOR = 4.0


class PreparationFailed(DecodeError):
    """Decoding or preparing an instance in a child process ran out of its memory limit, was
    killed by a signal or ran past its time limit. Caused by the data: permanent."""


class PreparationDeadline(NodeError):
    """The caller's deadline (the job's time limit) passed while its instances were prepared."""


class PoolClosed(NodeError):
    """The pool was closed (the node is stopping)."""


# ------------------------------------------------------------------------------------------------
# the child


def _address_space() -> int:
    """This process's virtual size in bytes (what RLIMIT_AS limits)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _tune_malloc() -> None:
    """At most two malloc arenas: each thread's own arena reserves 64 MiB of address space, which
    would count against RLIMIT_AS without being used. Blocks up to 32 MiB (a radiograph's bytes,
    its decoded frame) come from the heap and up to 128 MiB of freed heap is kept, so that the
    next image reuses the pages of the last instead of mapping fresh ones and faulting each in
    (~2.5 ms of a 10 MB radiograph's preparation); what is kept counts against the limit like
    any allocation, and the next image's allocations take it first."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_ARENA_MAX, 2)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * MIB)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * MIB)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process ``pid`` has used (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _lower_priority(niceness: int) -> None:
    """Raise this process's niceness to ``niceness`` (never lower it: that needs privileges)."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if niceness > current:
        os.setpriority(os.PRIO_PROCESS, 0, min(19, niceness))


def _is_memory(exc: BaseException) -> bool:
    """True when ``exc`` or what it wraps says an allocation failed."""
    for item in _causes(exc):
        if isinstance(item, MemoryError):
            return True
        text = str(item)
        if type(item).__module__.startswith("cv2") and (
            "Insufficient memory" in text or "Failed to allocate" in text
        ):
            return True
    return False


def _causes(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(out) < 16 and all(current is not e for e in out):
        out.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return out


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else the nearest node error (or RuntimeError) with its text."""
    try:
        back = pickle.loads(pickle.dumps(exc))
    except Exception:  # an exception type whose __init__ does not take its args back
        back = None
    if isinstance(back, BaseException):
        return back
    for base in (PreprocessError, DecodeError, NodeError):
        if isinstance(exc, base):
            return base(str(exc))
    return RuntimeError(f"{type(exc).__name__}: {exc}")


def _encode_error(exc: BaseException) -> list[bytes]:
    """The exception and its causes, each pickled on its own (the chain does not pickle); the
    first carries a note with the child's stack (file, line, code: no values)."""
    chain = [_portable(e) for e in _causes(exc)]
    frames = "".join(traceback.format_tb(exc.__traceback__))
    chain[0].add_note(f"in the preparation process (pid {os.getpid()}):\n{frames}")
    return [pickle.dumps(e) for e in chain]


def _shm_name(pid: int, task: int, position: int) -> str:
    return f"pacs-node-{pid}-{task}-{position}"


def _room_in_shm(nbytes: int) -> bool:
    try:
        st = os.statvfs(_SHM_DIR)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize > nbytes + 16 * MIB


#: where an array lies in a block: offset, bytes, shape, dtype
_Spec = tuple[int, int, tuple[int, ...], str]


def _write_block(path: str, arrays: list[np.ndarray]) -> None:
    """``arrays`` one after the other (each at a multiple of _ALIGN) into a new file of /dev/shm
    (one copy, by write(2): no mapping to set up and tear down, nothing for multiprocessing's
    resource tracker to register); a partial file is removed."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        for arr in arrays:
            view = arr.reshape(-1).view(np.uint8).data
            while view:
                view = view[os.write(fd, view) :]
            pad = -arr.nbytes % _ALIGN
            if pad:
                os.write(fd, bytes(pad))
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def _map_block(path: str) -> mmap.mmap:
    """A private (copy-on-write) mapping of a block the child wrote, whose name is removed at
    once: the arrays read from it are views of the pages the child filled, not copies, and they
    stay writable; the memory goes when the last of them does."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.unlink(path)
        return mmap.mmap(
            fd, os.fstat(fd).st_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
    finally:
        os.close(fd)


def _send_frames(conn: Connection, task: int, position: int, frames: list[PreparedFrame]) -> None:
    """One instance's frames to the parent: arrays in one shared-memory block (or, when
    /dev/shm has no room, as raw bytes after the message), the rest pickled."""
    arrays: list[np.ndarray] = []
    specs: list[tuple[_Spec | None, _Spec | None]] = []
    offset = 0

    def place(arr: np.ndarray) -> _Spec:
        nonlocal offset
        arr = np.ascontiguousarray(arr)
        arrays.append(arr)
        spec = (offset, arr.nbytes, tuple(arr.shape), arr.dtype.str)
        offset += -(-arr.nbytes // _ALIGN) * _ALIGN
        return spec

    for f in frames:
        tensor = None if f.model_input is None else place(f.model_input.tensor)
        specs.append((tensor, None if f.display is None else place(f.display)))
    meta = [
        (
            f.index,
            f.header,
            f.model_input and f.model_input.geometry,
            f.model_input and f.model_input.layout,
            spec,
        )
        for f, spec in zip(frames, specs, strict=True)
    ]
    dataset = frames[0].dataset if frames else None
    name = None
    if offset and _room_in_shm(offset):
        name = _shm_name(os.getpid(), task, position)
        try:
            _write_block(os.path.join(_SHM_DIR, name), arrays)
        except OSError as exc:  # e.g. /dev/shm filled up meanwhile: through the pipe
            log.debug("shared memory block not written (%s); sending through the pipe", exc.strerror)
            name = None
    conn.send(("item", position, dataset, meta, name))
    if name is None:
        for arr in arrays:
            conn.send_bytes(arr.data.cast("B"))


def _run_task(
    conn: Connection, task: tuple[int, Sequence[Item], PrepareSpec | DisplaySpec, Budget, int]
) -> bool:
    """Prepare one run of a submit's items (the first at position ``offset`` of the submit);
    False when the child should end (it ran out of memory)."""
    task_id, items, spec, budget, offset = task
    position = offset
    try:
        for position, item in enumerate(items, start=offset):
            _send_frames(conn, task_id, position, spec.prepare(item, position, budget))
        conn.send(("done",))
        return True
    except Exception as exc:  # everything goes to the parent, typed; this process carries on
        memory = _is_memory(exc)
        try:
            if memory:
                conn.send(("memory", position, None))
            else:
                conn.send(("error", position, _encode_error(exc)))
        except (MemoryError, OSError):  # out of memory even for that, or the parent went away
            return False  # the parent sees the child end: "the decoder process exited"
        return not memory


def child_main(conn: Connection, memory_bytes: int, niceness: int = 0) -> None:
    """A preparation process: run at ``niceness``, limit its own address space to its warm size
    + ``memory_bytes``, then prepare what the parent sends until it sends None (or goes away)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the node, which stops us
    redact_library_logs()  # what pydicom logs while decoding here quotes no data values either
    _tune_malloc()
    _lower_priority(niceness)
    import cv2  # noqa: F401 - already in the forkserver; imported before measuring, in any case

    baseline = _address_space()
    limit = baseline + memory_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core file of patient pixels
    conn.send(("ready", os.getpid(), baseline, limit))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None or not _run_task(conn, task):
            return


# ------------------------------------------------------------------------------------------------
# the parent


class _Lost(Exception):
    """The child ended (or was ended) before it answered."""


@dataclass(eq=False)
class _Child:
    process: BaseProcess  # multiprocessing's Process of the chosen context
    conn: Connection
    pid: int
    limit: int

    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


def _context(start_method: str) -> ForkServerContext | SpawnContext | ForkContext:
    """multiprocessing's context for ``start_method`` (each of these can start a Process)."""
    if start_method == "forkserver":
        return multiprocessing.get_context("forkserver")
    if start_method == "spawn":
        return multiprocessing.get_context("spawn")
    if start_method == "fork":
        return multiprocessing.get_context("fork")
    raise ValueError(f"cannot find context for {start_method!r}")


def _view(block: mmap.mmap, spec: _Spec) -> np.ndarray:
    offset, nbytes, shape, dtype = spec
    kind = np.dtype(dtype)
    return np.frombuffer(block, dtype=kind, count=nbytes // kind.itemsize, offset=offset).reshape(shape)


def _died(code: int | None) -> str:
    if code is None:
        return "the decoder process stopped answering"
    if code < 0:
        sig = -code
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown"
        hint = ": killed, e.g. by the system running out of memory" if sig == signal.SIGKILL else ""
        return f"the decoder crashed (signal {sig}, {name}{hint})"
    return f"the decoder process exited with status {code}"


@dataclass(eq=False)
class _Run:
    """A run of a submit's items given to one child: task id, items ``lo:hi``, and the item
    being prepared next."""

    task: int
    lo: int
    hi: int
    next: int


#: the most items one child takes at a time (a run)
_RUN_MAX = 8


def _runs(count: int, children: int) -> list[tuple[int, int]]:
    """``count`` items cut into runs ``(lo, hi)`` for ``children`` children: about three per
    child, so that the children finish together and the first images come back early, of at
    most :data:`_RUN_MAX` items."""
    if count <= 0:
        return []
    size = max(1, min(_RUN_MAX, -(-count // (3 * max(1, children)))))
    return [(lo, min(count, lo + size)) for lo in range(0, count, size)]


class PreparePool:
    """Persistent child processes that decode and prepare instances (see the module text).

    ``size``: children (at most this many submits run at once; more wait for a free one);
    ``memory_mib``: address space each may allocate beyond its warm size; ``timeout_s``: the
    most CPU time one child may spend on one submit (and :data:`_WALL_FACTOR` times that the
    longest a submit may take); ``niceness``: the children's scheduling niceness (0-19; the
    node's own threads and the model keep the cores first). Children start on first use and
    are replaced when they fail.
    """

    def __init__(
        self,
        size: int,
        memory_mib: int,
        timeout_s: float,
        start_method: Literal["forkserver", "spawn", "fork"] = "forkserver",
        niceness: int = 0,
    ) -> None:
        if size < 1 or memory_mib < 1:
            raise ValueError("a preparation pool needs at least one process and some memory")
        if not 0 <= niceness <= 19:
            raise ValueError("a niceness is 0 to 19")
        self.size, self.memory_mib, self.timeout_s, self.niceness = size, memory_mib, timeout_s, niceness
        self._ctx = _context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(_PRELOAD)
        self._slots: queue.LifoQueue[_Child | None] = queue.LifoQueue()
        for _ in range(size):
            self._slots.put(None)
        self._children: set[_Child] = set()
        self._lock = threading.Lock()
        self._tasks = itertools.count(1)
        self._closed = False
        self.replaced = 0  # children replaced after a failure (for tests and metrics)

    # -- children ----------------------------------------------------------------------------
    def _start_child(self) -> _Child:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=child_main,
            args=(child, self.memory_mib * MIB, self.niceness),
            name="pacs-node-prepare",
            daemon=True,
        )
        process.start()
        child.close()
        try:
            if not parent.poll(_START_TIMEOUT_S):
                raise _Lost("did not start")
            kind, pid, baseline, limit = parent.recv()
        except (_Lost, EOFError, OSError) as exc:
            process.kill()
            process.join(5)
            parent.close()
            raise NodeError(f"a preparation process could not start: {_died(process.exitcode)}") from exc
        assert kind == "ready"
        log.debug(
            "preparation process %d ready: %d MiB warm, limit %d MiB", pid, baseline // MIB, limit // MIB
        )
        out = _Child(process, parent, pid, limit)
        with self._lock:
            self._children.add(out)
        return out

    def _acquire(self, until: float, block: bool = True) -> _Child | None:
        """A child for one task: the next free one (a fresh one where its slot has none, or its
        last one died). ``block``: wait until ``until`` for one; else None when none is free."""
        if self._closed:
            raise PoolClosed("the preparation pool is closed")
        try:
            if block:
                slot = self._slots.get(timeout=max(0.0, until - time.monotonic()))
            else:
                slot = self._slots.get_nowait()
        except queue.Empty:
            if not block:
                return None
            raise PreparationDeadline(
                "no preparation process became free before the job's time limit"
            ) from None
        if slot is not None and slot.alive():
            return slot
        if slot is not None:
            self._forget(slot)
        try:
            return self._start_child()
        except BaseException:
            self._slots.put(None)
            raise

    def _release(self, child: _Child | None) -> None:
        if child is not None and self._closed:
            self._stop_child(child)
            child = None
        self._slots.put(child)

    def _forget(self, child: _Child) -> None:
        child.kill()
        with self._lock:
            self._children.discard(child)

    def _stop_child(self, child: _Child) -> None:
        with contextlib.suppress(OSError):
            child.conn.send(None)
        child.process.join(2)
        self._forget(child)

    def close(self) -> None:
        """Stop every child (a busy one is killed, its submit fails with PoolClosed)."""
        self._closed = True
        while True:
            try:
                slot = self._slots.get_nowait()
            except queue.Empty:
                break
            if slot is not None:
                self._stop_child(slot)
        with self._lock:
            busy = list(self._children)
        for child in busy:
            self._forget(child)

    # -- work --------------------------------------------------------------------------------
    def _item(self, child: _Child, message: tuple) -> list[PreparedFrame]:
        """One instance's frames from a child's "item" message (its arrays views of the
        shared-memory block, whose name is removed at once)."""
        _, position, dataset, meta, name = message
        arrays: list[np.ndarray] = []
        if name is not None:
            block = _map_block(os.path.join(_SHM_DIR, name))
            for *_, pair in meta:
                arrays.extend(_view(block, spec) for spec in pair if spec is not None)
        else:
            for *_, pair in meta:
                for spec in pair:
                    if spec is not None:
                        _, _, shape, dtype = spec
                        raw = child.conn.recv_bytes()
                        arrays.append(np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy())
        out = []
        taken = iter(arrays)
        for index, header, geometry, layout, (tensor, display) in meta:
            model_input = None if tensor is None else ModelInput(next(taken), geometry, layout)
            shown = None if display is None else next(taken)
            out.append(PreparedFrame(position, index, dataset, header, model_input, shown))
        return out

    def _unlink_left(self, child: _Child, task: int, positions: range) -> None:
        """Remove the blocks a failed child made and nobody took."""
        for position in positions:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(_SHM_DIR, _shm_name(child.pid, task, position)))

    def submit(
        self,
        items: Sequence[Item],
        spec: PrepareSpec | DisplaySpec,
        budget: Budget = DEFAULT_BUDGET,
        deadline: float | None = None,
    ) -> list[PreparedFrame]:
        """Prepare every frame of every item in children (see :meth:`stream`), returned in the
        order handed in."""
        frames = list(self.stream(items, spec, budget, deadline))
        frames.sort(key=lambda f: (f.item, f.index))  # stable: an item's frames are in order
        return frames

    def stream(
        self,
        items: Sequence[Item],
        spec: PrepareSpec | DisplaySpec,
        budget: Budget = DEFAULT_BUDGET,
        deadline: float | None = None,
    ) -> Iterator[PreparedFrame]:
        """Prepare every frame of every item within ``budget`` and this pool's memory and time
        limits, before ``deadline`` (monotonic); yield each instance's frames as soon as they
        are ready, so that the caller can run the model on the first while the others are
        prepared.

        The items go in small runs (:func:`_runs`) to the free children: the first child is
        waited for, more are taken while free, each takes the next run when it finishes one,
        so one submit uses every free core and a slow image holds up only its own run. An
        item's frames come in order; items come in no set order (``PreparedFrame.item`` says
        which). Raises what the preparation raised (DecodeError, PreprocessError, ...; of
        several, the earliest item's, once the other runs have ended), PreparationFailed (out
        of memory, a crash, over time: permanent) or PreparationDeadline. A caller that stops
        reading ends the children still busy for it.

        Over time means: a child spent ``timeout_s`` of CPU time on this submit, or the submit
        has taken :data:`_WALL_FACTOR` times ``timeout_s``; a submit that only waits for cores
        (taken by the model, other jobs) does not fail for it before then."""
        start = time.monotonic()
        wall_at = start + _WALL_FACTOR * self.timeout_s
        until = wall_at if deadline is None else min(wall_at, deadline)
        check_at = start + self.timeout_s  # the earliest a child can have used timeout_s of CPU
        over_cpu = False
        items = list(items)
        waiting = collections.deque(_runs(len(items), self.size))
        busy: dict[_Child, _Run] = {}
        cpu_at: dict[_Child, float] = {}  # a child's CPU seconds when this submit first gave it work
        failure: BaseException | None = None
        failed_at = len(items)

        def cpu_used() -> float:
            """The most CPU time a busy child has spent on this submit since it took it on."""
            used = [(cpu_seconds(child.pid) or cpu_at[child]) - cpu_at[child] for child in busy]
            return max(used, default=0.0)

        def fail(exc: BaseException, position: int) -> None:
            nonlocal failure, failed_at
            if failure is None or position < failed_at:
                failure, failed_at = exc, position

        def assign(child: _Child) -> None:
            lo, hi = waiting.popleft()
            run = _Run(next(self._tasks), lo, hi, lo)
            busy[child] = run  # before sending: a send that fails leaves the child's state unknown
            if child not in cpu_at:
                cpu_at[child] = cpu_seconds(child.pid) or 0.0
            child.conn.send((run.task, items[lo:hi], spec, budget, lo))

        def lost(child: _Child, run: _Run, memory: bool) -> None:
            code = self._replace(child, run)
            if self._closed:
                fail(PoolClosed("the preparation pool was closed (the node is stopping)"), run.next)
                return
            where = f" (image {run.next + 1} of {len(items)})"
            if memory:
                reason = f"decoding needed more than {self.memory_mib} MiB (limits.decode_memory_mib){where}"
            else:
                reason = f"{_died(code)}{where}"
            log.warning("preparation failed: %s; the process is replaced", reason)
            fail(PreparationFailed(reason), run.next)

        if not waiting:
            return
        first = self._acquire(until)
        assert first is not None
        try:
            assign(first)
            while busy:
                while waiting and failure is None and len(busy) < self.size:
                    more = self._acquire(until, block=False)
                    if more is None:
                        break
                    assign(more)
                now = time.monotonic()
                if now >= until:
                    raise TimeoutError
                if now >= check_at:
                    used = cpu_used()
                    if used >= self.timeout_s:
                        over_cpu = True
                        raise TimeoutError
                    check_at = now + self.timeout_s - used
                by_conn = {child.conn: child for child in busy}
                by_sentinel = {child.process.sentinel: child for child in busy}
                try:
                    ready = wait([*by_conn, *by_sentinel], timeout=min(until - now, check_at - now, 5.0))
                except (OSError, ValueError):  # a pipe closed under us: the pool is closing
                    if not self._closed:
                        raise
                    raise PoolClosed("the preparation pool was closed (the node is stopping)") from None
                for conn in [r for r in ready if r in by_conn]:
                    child = by_conn[conn]
                    run = busy[child]
                    try:
                        message = conn.recv()
                    except (EOFError, OSError):
                        del busy[child]
                        lost(child, run, memory=False)
                        continue
                    kind = message[0]
                    if kind == "item":
                        frames = self._item(child, message)
                        run.next = message[1] + 1  # the one being prepared next
                        if failure is None:
                            yield from frames
                        continue
                    del busy[child]
                    if kind == "done":
                        if waiting and failure is None:
                            assign(child)  # its CPU on this submit counted from its first run
                        else:
                            cpu_at.pop(child, None)
                            self._release(child)
                    elif kind == "error":
                        self._release(child)  # healthy: waiting for its next task
                        fail(_rebuild(message[2]), message[1])
                    else:  # "memory": the child ends itself
                        run.next = message[1]
                        lost(child, run, memory=True)
                for sentinel in [r for r in ready if r in by_sentinel]:
                    child = by_sentinel[sentinel]
                    if child in busy and not child.conn.poll():  # ended with nothing left to say
                        lost(child, busy.pop(child), memory=False)
        except TimeoutError:
            position = min((run.next for run in busy.values()), default=0)
            for child, run in list(busy.items()):
                del busy[child]
                self._replace(child, run)
            if not over_cpu and deadline is not None and deadline < wall_at:
                raise PreparationDeadline(
                    f"decoding and preparing {len(items)} images did not finish before the job's time limit"
                ) from None
            if over_cpu:
                reason = f"decoding took more than {self.timeout_s:g} s of CPU time (limits.decode_timeout_s)"
            else:
                reason = (
                    f"decoding did not finish in {_WALL_FACTOR * self.timeout_s:g} s "
                    f"({_WALL_FACTOR:g} times limits.decode_timeout_s)"
                )
            log.warning("preparation failed: %s; the process is replaced", reason)
            raise PreparationFailed(f"{reason} (image {position + 1} of {len(items)})") from None
        finally:
            # a child still busy here (the caller stopped reading, an item that does not
            # pickle, an interrupt) is in an unknown state: replaced
            for child, run in list(busy.items()):
                self._replace(child, run)
        if failure is not None:
            raise failure

    def _replace(self, child: _Child, run: _Run) -> int | None:
        """End ``child`` (it failed, or its state is unknown), remove the shared-memory blocks it
        left of ``run``, free its slot for a fresh child; its exit code."""
        if child.alive():
            child.process.join(0.5)  # it may be exiting on its own (out of memory)
        child.kill()
        code = child.process.exitcode
        with self._lock:
            self._children.discard(child)
        self._unlink_left(child, run.task, range(run.lo, run.hi))
        self._slots.put(None)  # a fresh child starts on the next submit
        self.replaced += 1
        return code


def _rebuild(chain: list[bytes]) -> BaseException:
    """The child's exception with its causes linked again."""
    excs: list[BaseException] = [pickle.loads(raw) for raw in chain]
    for exc, cause in itertools.pairwise(excs):
        exc.__cause__ = cause
    return excs[0]
