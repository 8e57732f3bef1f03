"""SIGKILL of the node during a 1,000-instance ingest (ten 100-slice CT series from four senders, the
models loaded and a destination up), then a restart and the senders sending everything again, as a
PACS retrying its failed transfers does:

- every instance acknowledged before the kill is on disk, byte-identical, and in the database;
- after the resend the store holds each of the 1,000 instances once, and the series and study
  counters count each once (the resent copies are acknowledged as duplicates, not added again);
- each series is analysed by exactly one job, over all of its 100 images;
- the destination receives each output once (storescp +uf keeps every copy it is sent).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
import yaml

from node.store.tables import load_list
from node.types import JobResult
from tests.helpers import (
    StoreSCP,
    analysing_config,
    dataset_bytes,
    free_port,
    make_series,
    need,
    node_db_url,
    query_db,
    send_until_failure,
    start_node_process,
    wait_for,
)

SERIES = 10
SLICES = 100
SENDERS = 4
KILL_AFTER = 300
QUIET_S = 3.0
pytestmark = pytest.mark.slow


def _send_all(port: int, series: list[list[Path]], acked: list[Path]) -> list[threading.Thread]:
    lock = threading.Lock()
    threads = [
        threading.Thread(
            target=send_until_failure,
            args=(port, [p for files in series[k::SENDERS] for p in files], acked, lock, "MODALITY"),
            daemon=True,
        )
        for k in range(SENDERS)
    ]
    for t in threads:
        t.start()
    return threads


def _spool_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "spool").rglob("*.dcm") if ".tmp" not in p.parts]


def test_sigkill_during_ingest_then_resend_processes_each_instance_once(tmp_path):
    need("storescp")
    dest_port = free_port()
    scp = StoreSCP(tmp_path / "received", dest_port)
    # quiet long enough that no series of the interrupted transfer completes before the resend
    config = analysing_config(
        tmp_path, dest_port, assembly={"series_quiet_s": QUIET_S, "poll_interval_s": 0.1}
    )
    port = yaml.safe_load(config.read_text())["dicom"]["port"]
    data_dir = Path(yaml.safe_load(config.read_text())["storage"]["data_dir"])
    db = node_db_url(config)
    study = pydicom.uid.generate_uid()
    series = [
        make_series(tmp_path / f"in{k}", SLICES, body_part="ABDOMEN", study_uid=study) for k in range(SERIES)
    ]
    uid_of = {p: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for s in series for p in s}
    log = tmp_path / "node.log"
    node = start_node_process(config, log)
    try:
        acked: list[Path] = []
        threads = _send_all(port, series, acked)
        deadline = time.monotonic() + 120
        while len(acked) < KILL_AFTER and time.monotonic() < deadline and any(t.is_alive() for t in threads):
            time.sleep(0.002)
        os.kill(node.pid, signal.SIGKILL)
        killed = time.monotonic()
        node.wait(30)
        for t in threads:
            t.join(60)
        assert KILL_AFTER <= len(acked) < SERIES * SLICES, "the kill must land mid-ingest"

        # what was acknowledged survived the kill: on disk, byte for byte, and in the database
        stored = dict(query_db(db, "select sop_instance_uid, path from instance"))
        for path in acked:
            assert uid_of[path] in stored, f"acknowledged {path.name} is not in the database"
            on_disk = data_dir / "spool" / stored[uid_of[path]]
            assert dataset_bytes(on_disk) == dataset_bytes(path), f"acknowledged {path.name} differs on disk"
        assert query_db(db, "select count(*) from job")[0][0] == 0, "no series may complete mid-transfer"

        # down for longer than the quiet period, as a node restarted by systemd may well be: the
        # downtime must not count as quiet, or the cut-off series would be analysed half-received
        time.sleep(max(0.0, QUIET_S + 0.5 - (time.monotonic() - killed)))
        node = start_node_process(config, log)
        resent: list[Path] = []
        for t in _send_all(port, series, resent):
            t.join(180)
        assert len(resent) == SERIES * SLICES, "every instance, duplicates included, is acknowledged"

        done = "select count(*) from job where state = 'done'"
        wait_for(lambda: query_db(db, done)[0][0] == SERIES, 300, "not every series was analysed")
        unsent = "select count(*) from outboxitem where state != 'sent'"
        wait_for(lambda: query_db(db, unsent)[0][0] == 0, 60, "outputs not delivered")
    finally:
        node.kill()
        node.wait(10)
        scp.stop()

    # the store: each instance once, counters counting each once, no partial file left
    assert sorted(r[0] for r in query_db(db, "select sop_instance_uid from instance")) == sorted(
        uid_of.values()
    )
    counts = query_db(db, "select series_uid, instance_count from series")
    assert sorted(c for _, c in counts) == [SLICES] * SERIES
    assert query_db(db, "select instance_count, series_count from study") == [(SERIES * SLICES, SERIES)]
    assert len(_spool_files(data_dir)) == SERIES * SLICES
    assert not list((data_dir / "spool" / ".tmp").iterdir())

    # processing: one job per series, each over all of its images
    jobs = query_db(db, "select series_uids, state, result from job")
    assert sorted(uid for uids, _, _ in jobs for uid in load_list(uids)) == sorted(uid for uid, _ in counts)
    assert {state for _, state, _ in jobs} == {"done"}
    assert [JobResult.model_validate_json(result).images for _, _, result in jobs] == [SLICES] * SERIES

    # outputs: each delivered once, under the UIDs the outbox recorded
    queued = sorted(r[0] for r in query_db(db, "select sop_instance_uid from outboxitem"))
    received = Counter(str(d.SOPInstanceUID) for d in scp.received())
    assert len(queued) >= 2 * SERIES  # an SR and a heatmap capture per series at least
    assert sorted(received) == queued
    twice = sorted(uid for uid, n in received.items() if n > 1)
    attempts = query_db(db, "select sop_instance_uid, kind, attempts, last_error from outboxitem")
    assert not twice, (
        f"{len(twice)} output(s) reached the destination twice: "
        f"{[a for a in attempts if a[0] in twice]}; the node said:\n{_warnings(log)}"
    )


def _warnings(log: Path) -> str:
    """The node's warning and error lines (both runs), for a failure's message."""
    lines = log.read_text(errors="replace").splitlines()
    return "\n".join(line for line in lines if " WARNING " in line or " ERROR " in line)[-6000:]
