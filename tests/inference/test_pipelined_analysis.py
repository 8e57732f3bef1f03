"""Preparation spread over the pool's processes and overlapped with inference (issue 16 item 2).

- One submit uses several children; what comes back equals what this process prepares, in the
  order handed in; an error in one image among several children is raised as it would be alone,
  and the pool carries on with no shared memory left behind.
- ``prepare_and_infer`` (frames handed to the model while the rest are prepared, through a
  SessionBatcher) gives the same images, outputs and probabilities as preparing everything and
  then running one batch, for an image-level model (cxr), a series model (ct-liver, slices put
  back in spatial order) and a patch model (mammo), in this process and through the pool.
- Two analyses of one model at once through one batcher give what each gives alone.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from node.budget import DEFAULT_BUDGET, Budget
from node.errors import DecodeError
from node.inference.batcher import SessionBatcher
from node.inference.explain import patch_scores
from node.inference.isolate import PreparePool
from node.inference.manifest import PatchHeatmap
from node.inference.postprocess import probabilities
from node.inference.prepared import Item, PreparedFrame, PrepareSpec, prepare_items
from node.inference.registry import load_registry
from node.inference.runtime import CPU, RuntimeConfig, create_session
from node.runner.analyse import Stopwatch, analyse, prepare_all, prepare_and_infer
from node.synth import generate_study

REPO = Path(__file__).resolve().parents[2]
LIMIT_MIB = 1024


@dataclass(frozen=True)
class WhoPrepared(PrepareSpec):
    """Writes the preparing process's pid into each data set (ImageComments)."""

    def prepare(self, item: Item, position: int, budget: Budget = DEFAULT_BUDGET) -> list[PreparedFrame]:
        frames = super().prepare(item, position, budget)
        for f in frames:
            f.dataset.ImageComments = str(os.getpid())
        return frames


@dataclass(frozen=True)
class FailsAt(PrepareSpec):
    """Fails on the items at ``positions`` (a DecodeError naming the position), after a pause
    for the first, so that several children are busy when they fail."""

    positions: tuple[int, ...] = ()

    def prepare(self, item: Item, position: int, budget: Budget = DEFAULT_BUDGET) -> list[PreparedFrame]:
        if position in self.positions:
            if position == self.positions[0]:
                time.sleep(0.3)
            raise DecodeError(f"bad image at {position}")
        return super().prepare(item, position, budget)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    tmp = tmp_path_factory.mktemp("pipelined")
    out: dict[str, list[Path]] = {"cxr": []}
    for seed in range(6):
        generate_study("cxr", tmp / f"cxr{seed}", seed=seed, scale=0.25, write_masks=False)
        out["cxr"] += sorted((tmp / f"cxr{seed}").glob("*.dcm"))
    generate_study("ct", tmp / "ct", seed=3, write_masks=False, slices=12)
    ct = sorted((tmp / "ct").glob("*.dcm"))
    out["ct"] = ct[::2] + ct[1::2]  # handed in out of spatial order
    generate_study("mammo", tmp / "mammo", seed=1, write_masks=False, scale=0.25)
    out["mammo"] = sorted((tmp / "mammo").glob("*.dcm"))[:2]
    return out


@pytest.fixture(scope="module")
def registry():  # noqa: ANN201
    return load_registry(REPO / "models" / "onnx")


@pytest.fixture(scope="module")
def pool():  # noqa: ANN201
    out = PreparePool(3, LIMIT_MIB, 60)
    yield out
    out.close()


def _shm_left() -> list[str]:
    return [p for p in os.listdir("/dev/shm") if p.startswith("pacs-node-")]


def test_one_submit_uses_several_children_and_keeps_the_order(pool, studies, registry) -> None:  # noqa: ANN001
    files = studies["cxr"]
    spec = WhoPrepared(registry.get("cxr").manifest)
    frames = pool.submit(files, spec)
    assert [f.item for f in frames] == list(range(len(files))), "in the order handed in"
    pids = {f.dataset.ImageComments for f in frames}
    assert len(pids) > 1, f"one child prepared all {len(files)} images"
    here = prepare_items(files, PrepareSpec(registry.get("cxr").manifest))
    for a, b in zip(frames, here, strict=True):
        assert a.header.sop_instance_uid == b.header.sop_instance_uid
        assert np.array_equal(a.model_input.tensor, b.model_input.tensor)
        assert np.array_equal(a.display, b.display)
    assert not _shm_left()


def test_the_earliest_failure_is_raised_and_the_pool_carries_on(pool, studies, registry) -> None:  # noqa: ANN001
    files = studies["cxr"]
    manifest = registry.get("cxr").manifest
    with pytest.raises(DecodeError, match=r"^bad image at 1\n"):
        pool.submit(files, FailsAt(manifest, positions=(1, 4)))
    assert not _shm_left(), "the images the other children prepared meanwhile are not left behind"
    assert len(pool.submit(files, PrepareSpec(manifest))) == len(files), "the pool carries on"


def test_a_reader_that_stops_early_leaves_nothing_behind(pool, studies, registry) -> None:  # noqa: ANN001
    files = studies["cxr"]
    manifest = registry.get("cxr").manifest
    stream = pool.stream(files, PrepareSpec(manifest))
    next(stream)
    stream.close()  # e.g. the model failed on the first batch
    assert not _shm_left()
    assert len(pool.submit(files, PrepareSpec(manifest))) == len(files)


def _sequential(model, session, files: Sequence[Path]) -> tuple[list, dict, np.ndarray]:  # noqa: ANN001
    """The path before the pipeline: prepare everything, then run the model."""
    manifest = model.manifest
    is_patch = isinstance(manifest.heatmap, PatchHeatmap)
    images = prepare_all(files, manifest, is_patch)
    if is_patch:
        spec = manifest.heatmap

        def predict(batch: np.ndarray) -> np.ndarray:
            raw = session.run(batch, [manifest.outputs.probabilities])[manifest.outputs.probabilities]
            return probabilities(manifest, raw)

        results = [
            patch_scores(
                im.model_input.tensor, predict, spec.patch_size, spec.stride, batch_size=spec.batch_size
            )
            for im in images
        ]
        return images, {}, np.stack([scores.max(axis=0) for scores, _ in results])
    outputs = session.run(np.concatenate([im.model_input.tensor for im in images]))
    return images, outputs, probabilities(manifest, outputs[manifest.outputs.probabilities])


@pytest.mark.parametrize("through_pool", [False, True], ids=["in-process", "pool"])
@pytest.mark.parametrize(("model_id", "kind"), [("cxr", "cxr"), ("ct-liver", "ct"), ("mammo", "mammo")])
def test_pipelined_equals_prepare_then_infer(pool, studies, registry, model_id, kind, through_pool) -> None:  # noqa: ANN001
    model = registry.get(model_id)
    session = create_session(model, RuntimeConfig(providers=(CPU,), max_batch=4))
    files = studies[kind]
    want_images, want_outputs, want_probs = _sequential(model, session, files)
    watch = Stopwatch(deadline=time.monotonic() + 600)
    is_patch = isinstance(model.manifest.heatmap, PatchHeatmap)
    images, outputs, probs, patches = prepare_and_infer(
        files, model.manifest, session, is_patch, preparer=pool if through_pool else None, watch=watch
    )
    assert [im.header.sop_instance_uid for im in images] == [im.header.sop_instance_uid for im in want_images]
    for a, b in zip(images, want_images, strict=True):
        assert np.array_equal(a.model_input.tensor, b.model_input.tensor)
    np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-6)
    assert set(outputs) == set(want_outputs)
    for name in outputs:
        np.testing.assert_allclose(outputs[name], want_outputs[name], rtol=1e-4, atol=1e-5)
    assert len(patches) == (len(files) if is_patch else 0)
    assert sum(watch.batches) >= len(files)
    assert {"preprocessing", "inferring"} <= set(watch.timings)


def test_two_analyses_at_once_through_one_batcher(pool, studies, registry) -> None:  # noqa: ANN001
    model = registry.get("ct-liver")
    session = create_session(model, RuntimeConfig(providers=(CPU,), max_batch=8))
    files = studies["ct"]

    def run(batcher) -> tuple:  # noqa: ANN001
        watch = Stopwatch(deadline=time.monotonic() + 600)
        result, _ = analyse(model, batcher, files, level="series", uid_seed="x", watch=watch, preparer=pool)
        return tuple((f.label, round(f.probability, 6)) for f in result.findings), [
            im.sop_instance_uid for im in result.images
        ]

    alone = run(session)
    batcher = SessionBatcher(session, model.id)
    got: list[tuple] = []
    threads = [threading.Thread(target=lambda: got.append(run(batcher))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    batcher.close()
    assert got == [alone, alone]
    assert batcher.runs >= 2


PREPARED: list[int] = []  # positions prepared so far, in this process


@dataclass(frozen=True)
class Counted(PrepareSpec):
    """Records each item it prepared; each after the first takes a little longer."""

    def prepare(self, item: Item, position: int, budget: Budget = DEFAULT_BUDGET) -> list[PreparedFrame]:
        if position:
            time.sleep(0.1)
        frames = super().prepare(item, position, budget)
        PREPARED.append(position)
        return frames


class Watching:
    """The session, recording how many images were prepared when each run began; it reports
    ``provider`` as where it runs (the hand-in policy depends on it, not the arithmetic)."""

    def __init__(self, session, provider: str) -> None:  # noqa: ANN001
        self.session, self.max_batch, self.seen = session, session.max_batch, []
        self.active_provider = provider

    def run(self, batch, outputs=None):  # noqa: ANN001, ANN201
        self.seen.append((len(PREPARED), int(batch.shape[0])))
        if self.active_provider != CPU:
            time.sleep(0.25)  # a model slower than preparing an image (0.1 s each here)
        return self.session.run(batch, outputs)


@pytest.mark.parametrize(
    ("provider", "max_batch", "runs"),
    [
        # on a GPU the first image goes at once, later runs take what came meanwhile
        ("CUDAExecutionProvider", 16, None),
        # on the CPU (the cores are shared) full batches go as they fill, the rest at the end
        ("CPUExecutionProvider", 4, [4, 2]),
        ("CPUExecutionProvider", 16, [6]),
    ],
)
def test_the_model_starts_before_the_last_image_is_prepared(  # noqa: ANN201
    studies,
    registry,
    monkeypatch,
    provider,
    max_batch,
    runs,  # noqa: ANN001
):
    analyse_module = sys.modules["node.runner.analyse"]
    model = registry.get("cxr")
    session = Watching(create_session(model, RuntimeConfig(providers=(CPU,), max_batch=max_batch)), provider)
    monkeypatch.setattr(analyse_module, "_spec", lambda manifest, is_patch: Counted(manifest))
    PREPARED.clear()
    files = studies["cxr"]
    prepare_and_infer(files, model.manifest, session, False)
    assert sum(n for _, n in session.seen) == len(files)
    if runs is None:
        assert session.seen[0] == (1, 1), f"the first image waited for others: {session.seen}"
        assert len(session.seen) < len(files), "the images prepared meanwhile go in one run"
    else:
        assert [n for _, n in session.seen] == runs
        if len(runs) > 1:
            assert session.seen[0][0] < len(files), f"the first batch waited for every image: {session.seen}"


@dataclass(frozen=True)
class NoRoomInShm(PrepareSpec):
    """Prepares as /dev/shm were full: the child sends the arrays through its pipe instead."""

    def prepare(self, item: Item, position: int, budget: Budget = DEFAULT_BUDGET) -> list[PreparedFrame]:
        sys.modules["node.inference.isolate"]._room_in_shm = lambda nbytes: False  # in the child
        return super().prepare(item, position, budget)


@pytest.mark.parametrize("spec_type", [PrepareSpec, NoRoomInShm], ids=["shared-memory", "pipe"])
def test_arrays_come_back_exact_and_writable_either_way(studies, registry, spec_type) -> None:  # noqa: ANN001
    files = studies["cxr"][:3]
    manifest = registry.get("cxr").manifest
    pool = PreparePool(1, LIMIT_MIB, 60)
    try:
        frames = pool.submit(files, spec_type(manifest))
    finally:
        pool.close()
    here = prepare_items(files, PrepareSpec(manifest))
    for a, b in zip(frames, here, strict=True):
        assert np.array_equal(a.model_input.tensor, b.model_input.tensor)
        assert np.array_equal(a.display, b.display)
        a.display[0, 0] ^= 1  # the node's own copy: writable (copy-on-write pages, or a copy)
        a.model_input.tensor.flat[0] += 1.0
    assert not _shm_left()
