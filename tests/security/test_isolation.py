"""Decoding in child processes (issue 21, item 1): an image whose decode and preparation need more
memory than ``limits.decode_memory_mib`` fails its job permanently with that reason, the
preparation process is replaced and the node keeps serving; so does a crash (a signal) or a decode
past ``limits.decode_timeout_s``.

The image is valid and its headers are within the budget (an 8192x8192 16-bit DX, RLE lossless,
2 MB on the wire: 2^26 pixels, the most ``limits.max_frame_pixels`` lets through), so the header
checks let it through; its decoded frame alone is 128 MiB (its preparation peaks at ~320 MiB),
over the 100 MiB the node below allows, however lean the preparation gets. The node runs in a
subprocess under an address-space limit (tests/security/limited), so a regression fails this test
instead of taking the machine down.
"""

from __future__ import annotations

import importlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless, generate_uid

from node.budget import DEFAULT_BUDGET, Budget
from node.errors import DecodeError
from node.inference.isolate import PreparationFailed, PreparePool
from node.inference.prepared import Item, PreparedFrame, PrepareSpec, prepare_items
from node.inference.registry import load_registry
from node.inference.runtime import RuntimeConfig, create_session
from node.settings import LimitsSettings, load_settings
from node.synth import generate_study
from tests.helpers import (
    REPO,
    StoreSCP,
    analysing_config,
    free_port,
    fresh_copy,
    need,
    node_db_url,
    query_db,
    raw_store_file,
    wait_port,
)
from tests.security.limited import start_limited_node

pytestmark = pytest.mark.slow
LIMIT_MIB = 100


def oversized(template: Path, dst: Path, side: int = 8192) -> Path:
    """``template`` (a DX) with a ``side`` x ``side`` 12-bit image, RLE lossless: a few large
    flat regions, so that the file stays small while its decode is 2 bytes a pixel."""
    ds = pydicom.dcmread(template)
    yy, xx = np.ogrid[0:side, 0:side]
    image = np.full((side, side), 200, np.uint16)
    image[(yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 3) ** 2] = 1800
    image[side // 4 : side // 3, side // 5 : side // 2] = 3000
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.compress(RLELossless, image)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small CXR (the template), the oversized DX made from it, and a 3-slice CT."""
    tmp = tmp_path_factory.mktemp("isolation")
    generate_study("cxr", tmp / "cxr", seed=5, label="normal", scale=0.25, write_masks=False)
    generate_study("ct", tmp / "ct", seed=3, label="normal", write_masks=False, slices=3)
    template = sorted((tmp / "cxr").glob("*.dcm"))[0]
    big = oversized(template, tmp / "big" / "big.dcm")
    assert big.stat().st_size < 4 * 2**20, "the image is meant to be small on the wire"
    return {"cxr": template, "big": big, "ct": tmp / "ct", "tmp": tmp}


@pytest.fixture(scope="module")
def registry():  # noqa: ANN201
    return load_registry(REPO / "models" / "onnx")


@pytest.fixture(scope="module")
def manifests(registry) -> dict[str, object]:  # noqa: ANN001
    return {m: registry.get(m).manifest for m in ("cxr", "ct-liver")}


# -- the node, in a subprocess -------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(files):  # noqa: ANN001, ANN201
    need("storescp")
    tmp = files["tmp"] / "node"
    tmp.mkdir()
    dest_port, web_port = free_port(), free_port()
    config = analysing_config(
        tmp,
        dest_port,
        assembly={"series_quiet_s": 0.3, "poll_interval_s": 0.1},
        runner={"max_attempts": 3, "retry_backoff_s": 0},
        web={"enabled": True, "host": "127.0.0.1", "port": web_port},
        limits={"decode_memory_mib": LIMIT_MIB},
    )
    scp = StoreSCP(tmp / "received", dest_port)
    proc = start_limited_node(config, tmp / "node.log")
    try:
        wait_port(web_port, 60)  # start_limited_node waits for the DICOM port only
    except TimeoutError:
        proc.kill()
        raise
    client = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", timeout=120)
    yield proc, config, scp, client
    client.close()
    proc.terminate()
    try:
        proc.wait(30)
    except Exception:
        proc.kill()
    scp.stop()


def _port(config: Path) -> int:
    return load_settings(config).dicom.port


def _wait_job(db: str, series_uid: str, proc, timeout: float = 120) -> tuple:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    rows: list[tuple] = []
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the node died"
        rows = query_db(db, f"SELECT state, attempts, error FROM job WHERE series_uids LIKE '%{series_uid}%'")
        if rows and all(r[0] in ("done", "failed") for r in rows):
            assert len(rows) == 1, rows
            return rows[0]
        time.sleep(0.2)
    raise AssertionError(f"no finished job for series {series_uid}: {rows}")


def _normal_study_is_analysed(node, files, name: str) -> None:  # noqa: ANN001
    proc, config, scp, _ = node
    good = fresh_copy(files["cxr"], files["tmp"] / "good" / f"{name}.dcm", generate_uid(), generate_uid())
    ds = pydicom.dcmread(good, stop_before_pixels=True)
    assert raw_store_file(_port(config), good) == 0, f"the node no longer stores after {name}"
    state, _, error = _wait_job(node_db_url(config), str(ds.SeriesInstanceUID), proc)
    assert state == "done", f"a normal study after {name} was not analysed: {error}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(str(r.StudyInstanceUID) == str(ds.StudyInstanceUID) for r in scp.received()):
            return
        time.sleep(0.2)
    raise AssertionError(f"no output sent for the normal study after {name}")


def test_decode_over_the_memory_limit_fails_its_job_once(node, files) -> None:  # noqa: ANN001
    proc, config, _, _ = node
    big = files["big"]
    assert raw_store_file(_port(config), big) == 0, "the bytes are stored as received"
    series = str(pydicom.dcmread(big, stop_before_pixels=True).SeriesInstanceUID)
    state, attempts, error = _wait_job(node_db_url(config), series, proc)
    assert state == "failed", f"the job should fail on the memory limit: {error}"
    assert attempts == 1, f"a permanent failure is not retried (attempts {attempts})"
    assert f"decoding needed more than {LIMIT_MIB} MiB (limits.decode_memory_mib)" in error, error
    assert proc.poll() is None, "the node died"
    _normal_study_is_analysed(node, files, "over-memory")


def test_upload_over_the_memory_limit_is_refused_with_the_reason(node, files) -> None:  # noqa: ANN001
    proc, _, _, client = node
    answer = client.post(
        "/api/v1/infer", files={"file": ("big.dcm", files["big"].read_bytes(), "application/dicom")}
    )
    assert answer.status_code == 422, answer.text
    assert f"decoding needed more than {LIMIT_MIB} MiB" in answer.text, answer.text
    assert proc.poll() is None, "the node died"
    normal = client.post(
        "/api/v1/infer", files={"file": ("cxr.dcm", files["cxr"].read_bytes(), "application/dicom")}
    )
    assert normal.status_code == 200, normal.text


# -- the pool, in this process (its children are separate processes) ----------------------------


@dataclass(frozen=True)
class Crashing(PrepareSpec):
    """Kills its own process with ``signum`` at the second item (a codec crash, the OOM killer)."""

    signum: int = signal.SIGSEGV

    def prepare(self, item: Item, position: int, budget: Budget = DEFAULT_BUDGET) -> list[PreparedFrame]:
        if position == 1:
            os.kill(os.getpid(), self.signum)
        return super().prepare(item, position, budget)


@dataclass(frozen=True)
class Slow(PrepareSpec):
    """Takes ``seconds`` before it prepares anything (a decoder in an endless loop)."""

    seconds: float = 30.0

    def prepare(self, item: Item, position: int, budget: Budget = DEFAULT_BUDGET) -> list[PreparedFrame]:
        time.sleep(self.seconds)
        return super().prepare(item, position, budget)


@pytest.fixture
def pool() -> PreparePool:
    out = PreparePool(1, LIMIT_MIB, 20)
    yield out
    out.close()


def test_the_pool_prepares_what_the_process_would(pool, files, manifests) -> None:  # noqa: ANN001
    for items, manifest, keep in (
        ([files["cxr"]], manifests["cxr"], True),
        (sorted(files["ct"].glob("*.dcm")), manifests["ct-liver"], False),
    ):
        spec = PrepareSpec(manifest, keep_display=keep)
        here, there = prepare_items(items, spec), pool.submit(items, spec)
        assert len(here) == len(there) == len(items)
        for a, b in zip(here, there, strict=True):
            assert (a.item, a.index, a.header) == (b.item, b.index, b.header)
            assert b.model_input.tensor.dtype == a.model_input.tensor.dtype
            np.testing.assert_array_equal(a.model_input.tensor, b.model_input.tensor)
            assert a.model_input.geometry == b.model_input.geometry
            assert (a.display is None) == (b.display is None) == (not keep)
            if keep:
                np.testing.assert_array_equal(a.display, b.display)
            assert b.dataset.SOPInstanceUID == a.dataset.SOPInstanceUID
            assert "PixelData" not in b.dataset
    assert pool.replaced == 0


def test_a_series_model_decodes_its_shown_frames_again_in_the_child(  # noqa: ANN201
    pool, files, registry, monkeypatch
):  # noqa: ANN001
    analysis = importlib.import_module("node.runner.analyse")  # node.runner.analyse is also a function

    model = registry.get("ct-liver")
    session = create_session(model, RuntimeConfig(intra_op_threads=1, warmup=False))
    ct = sorted(files["ct"].glob("*.dcm"))

    def run(preparer):  # noqa: ANN001, ANN202
        watch = analysis.Stopwatch(deadline=time.monotonic() + 120)
        result, _ = analysis.analyse(
            model, session, ct, level="series", uid_seed="t", watch=watch, preparer=preparer
        )
        return result

    here = run(None)
    monkeypatch.setattr(analysis, "decode_frame", None)  # nothing is decoded in this process
    there = run(pool)
    assert len(there.images) == len(here.images) > 0
    for a, b in zip(here.images, there.images, strict=True):
        assert a.sop_instance_uid == b.sop_instance_uid
        np.testing.assert_array_equal(a.display, b.display)
    assert [f.probability for f in there.findings] == [f.probability for f in here.findings]
    assert pool.replaced == 0


def test_over_the_memory_limit_the_child_is_replaced(pool, files, manifests) -> None:  # noqa: ANN001
    spec = PrepareSpec(manifests["cxr"])
    with pytest.raises(PreparationFailed) as failed:
        pool.submit([files["cxr"], files["big"]], spec)
    assert str(failed.value) == (
        f"decoding needed more than {LIMIT_MIB} MiB (limits.decode_memory_mib) (image 2 of 2)"
    )
    assert pool.replaced == 1
    assert len(pool.submit([files["cxr"]], spec)) == 1, "a fresh child prepares the next job"
    assert not [p for p in os.listdir("/dev/shm") if p.startswith("pacs-node-")], "shared memory left"


@pytest.mark.parametrize(
    ("signum", "shown"), [(signal.SIGSEGV, "signal 11, SIGSEGV"), (signal.SIGKILL, "signal 9")]
)
def test_a_crash_fails_the_job_with_the_signal(pool, files, manifests, signum, shown) -> None:  # noqa: ANN001
    spec = Crashing(manifests["cxr"], signum=signum)
    with pytest.raises(PreparationFailed) as failed:
        pool.submit([files["cxr"], files["cxr"]], spec)
    assert f"the decoder crashed ({shown}" in str(failed.value)
    assert "(image 2 of 2)" in str(failed.value)
    assert isinstance(failed.value, DecodeError), "permanent, as every DecodeError"
    assert len(pool.submit([files["cxr"]], PrepareSpec(manifests["cxr"]))) == 1
    assert pool.replaced == 1


@dataclass(frozen=True)
class Busy(PrepareSpec):
    """Works on the CPU for ``seconds`` of its own CPU time before it prepares anything (a decoder
    looping over its input)."""

    seconds: float = 30.0

    def prepare(self, item: Item, position: int, budget: Budget = DEFAULT_BUDGET) -> list[PreparedFrame]:
        start = time.process_time()
        while time.process_time() - start < self.seconds:
            sum(range(10_000))
        return super().prepare(item, position, budget)


def test_a_decode_over_its_cpu_time_is_ended(files, manifests) -> None:  # noqa: ANN001
    pool = PreparePool(1, LIMIT_MIB, 1.0)
    try:
        with pytest.raises(PreparationFailed) as failed:
            pool.submit([files["cxr"]], Busy(manifests["cxr"]))
        assert str(failed.value) == (
            "decoding took more than 1 s of CPU time (limits.decode_timeout_s) (image 1 of 1)"
        )
        assert pool.replaced == 1
        assert len(pool.submit([files["cxr"]], PrepareSpec(manifests["cxr"]))) == 1
    finally:
        pool.close()


def test_waiting_for_a_core_does_not_count_but_a_child_that_never_answers_is_ended(files, manifests) -> None:  # noqa: ANN001
    """A child that takes 2.5 s without working (as one waiting for a core the model holds)
    passes a 1 s limit; one that takes longer than 4 times the limit fails all the same."""
    pool = PreparePool(1, LIMIT_MIB, 1.0)
    try:
        prepared = pool.submit([files["cxr"], files["cxr"]], Slow(manifests["cxr"], seconds=1.25))
        assert len(prepared) == 2 and pool.replaced == 0
        with pytest.raises(PreparationFailed) as failed:
            pool.submit([files["cxr"]], Slow(manifests["cxr"]))
        assert str(failed.value) == (
            "decoding did not finish in 4 s (4 times limits.decode_timeout_s) (image 1 of 1)"
        )
        assert pool.replaced == 1
        assert len(pool.submit([files["cxr"]], PrepareSpec(manifests["cxr"]))) == 1
    finally:
        pool.close()


def test_the_children_run_at_the_pools_niceness(files, manifests) -> None:  # noqa: ANN001
    pool = PreparePool(2, LIMIT_MIB, 20, niceness=7)
    try:
        frames = pool.submit([files["cxr"]] * 4, PrepareSpec(manifests["cxr"]))
        assert len(frames) == 4
        children = list(pool._children)  # noqa: SLF001 - the test reads the children's pids
        assert children
        assert {os.getpriority(os.PRIO_PROCESS, c.pid) for c in children} == {7}
        assert os.getpriority(os.PRIO_PROCESS, 0) == 0, "the node itself keeps its priority"
    finally:
        pool.close()
    with pytest.raises(ValueError, match="niceness"):
        PreparePool(1, LIMIT_MIB, 20, niceness=20)


def test_errors_in_the_child_keep_their_type_and_text(pool, files, manifests) -> None:  # noqa: ANN001
    broken = files["tmp"] / "broken.dcm"
    data = files["cxr"].read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # pixel data cut short
    spec = PrepareSpec(manifests["cxr"])
    with pytest.raises(DecodeError) as here:
        prepare_items([broken], spec)
    with pytest.raises(DecodeError) as there:
        pool.submit([broken], spec)
    assert type(there.value) is type(here.value)
    assert str(there.value) == str(here.value)
    assert pool.replaced == 0, "the child carries on after an error it reported"
    assert len(pool.submit([files["cxr"]], spec)) == 1


def test_the_memory_limit_defaults_from_the_budget_and_zero_decodes_in_process(tmp_path) -> None:  # noqa: ANN001
    from node.app import preparation_pool

    assert LimitsSettings().decode_memory() == 3072
    assert LimitsSettings(max_frame_pixels=2**24).decode_memory() == 2048 + 256
    assert LimitsSettings(decode_memory_mib=0).decode_memory() == 0
    assert preparation_pool(load_settings(None, limits={"decode_memory_mib": 0})) is None
    made = preparation_pool(load_settings(None, runner={"workers": 3}))
    assert made is not None and made.size == 4 and made.memory_mib == 3072
    assert made.niceness == 10 and made.timeout_s == 300
    made.close()
    made = preparation_pool(load_settings(None, limits={"prepare_niceness": 0}))
    assert made is not None and made.niceness == 0
    made.close()
