"""SessionBatcher: requests of several threads merged into shared runs of one real ONNX Runtime
session (the bundled cxr model), each caller getting exactly its own rows; errors reach every
caller of the run; oversized and differently shaped requests run apart."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from node.errors import InferenceError
from node.inference.batcher import SessionBatcher
from node.inference.registry import load_registry
from node.inference.runtime import CPU, RuntimeConfig, create_session

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def session():  # noqa: ANN201
    model = load_registry(REPO / "models" / "onnx").get("cxr")
    return create_session(model, RuntimeConfig(providers=(CPU,), max_batch=8, warmup=False))


def _inputs(session, count: int, seed: int) -> np.ndarray:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    shape = (count, 1, 128, 128)
    return rng.normal(0.0, 1.0, shape).astype(session.input_dtype)


class Gated:
    """The session, but each run waits for ``gate`` (so that requests pile up behind it) and is
    recorded with its batch size."""

    def __init__(self, session) -> None:  # noqa: ANN001
        self.session = session
        self.max_batch = session.max_batch
        self.gate = threading.Event()
        self.sizes: list[int] = []

    def run(self, batch, outputs=None):  # noqa: ANN001, ANN201
        self.gate.wait(30)
        self.sizes.append(int(batch.shape[0]))
        return self.session.run(batch, outputs)


def _started(future) -> None:  # noqa: ANN001
    """Wait until the batcher's thread has taken ``future`` (and waits at the gate)."""
    while not future.running():
        threading.Event().wait(0.01)


def test_waiting_requests_share_one_run_and_get_their_own_rows(session) -> None:  # noqa: ANN001
    gated = Gated(session)
    batcher = SessionBatcher(gated, "cxr")
    try:
        first = batcher.submit(_inputs(session, 1, 0))  # the thread takes it and waits at the gate
        _started(first)
        batches = [_inputs(session, n, seed) for seed, n in enumerate((2, 3, 1, 2), start=1)]
        futures = [batcher.submit(b) for b in batches]
        gated.gate.set()
        results = [f.result(30) for f in futures]
    finally:
        batcher.close()
    assert gated.sizes == [1, 8], "the four waiting requests (8 rows) went in one run"
    assert batcher.runs == 2 and batcher.merged == 3
    for batch, result in zip(batches, results, strict=True):
        alone = session.run(batch)
        assert set(result) == set(alone)
        for name in alone:
            assert result[name].shape == alone[name].shape
            np.testing.assert_allclose(result[name], alone[name], rtol=1e-5, atol=1e-6)


def test_a_run_is_at_most_max_batch_and_shapes_do_not_mix(session) -> None:  # noqa: ANN001
    gated = Gated(session)
    batcher = SessionBatcher(gated, "cxr")
    try:
        blocker = batcher.submit(_inputs(session, 1, 0))
        _started(blocker)
        small = [batcher.submit(_inputs(session, 5, s)) for s in (1, 2)]  # 5 + 5 > 8: two runs
        big = batcher.submit(_inputs(session, 11, 3))  # more than max_batch: alone, cut by the session
        wrong = batcher.submit(np.zeros((1, 1, 64, 64), dtype=session.input_dtype))  # another shape
        gated.gate.set()
        for f in (*small, big):
            f.result(30)
        with pytest.raises(InferenceError):  # the model takes 128x128 only: its own run fails
            wrong.result(30)
    finally:
        batcher.close()
    assert gated.sizes == [1, 5, 5, 11, 1]
    assert big.result()[session.output_names[0]].shape[0] == 11


def test_an_error_reaches_every_request_of_its_run(session) -> None:  # noqa: ANN001
    class Failing(Gated):
        def run(self, batch, outputs=None):  # noqa: ANN001, ANN201
            self.gate.wait(30)
            if batch.shape[0] > 1:
                raise InferenceError("model cxr: run failed (test)")
            return self.session.run(batch, outputs)

    failing = Failing(session)
    batcher = SessionBatcher(failing, "cxr")
    try:
        ok = batcher.submit(_inputs(session, 1, 0))
        _started(ok)
        merged = [batcher.submit(_inputs(session, 1, s)) for s in (1, 2)]
        failing.gate.set()
        assert ok.result(30)
        for f in merged:
            with pytest.raises(InferenceError, match="run failed"):
                f.result(30)
        assert batcher.run(_inputs(session, 1, 4)), "the batcher carries on after a failed run"
    finally:
        batcher.close()


def test_closed_batcher_refuses_and_its_thread_ends(session) -> None:  # noqa: ANN001
    batcher = SessionBatcher(session, "cxr")
    batcher.run(_inputs(session, 2, 0))
    thread = batcher._thread
    batcher.close()
    assert thread is not None and not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(_inputs(session, 1, 0))
    assert batcher.active_provider == session.active_provider, "other attributes are the session's"
