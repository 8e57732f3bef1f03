"""Assembly: a series completes after its quiet period; the state survives a restart."""

from __future__ import annotations

import time

from sqlmodel import Session, select

from node.app import build_node
from node.settings import load_settings
from node.store.tables import Series, SeriesState, Study, StudyState
from tests.helpers import make_series, raw_store_file, write_config


def _series_states(node) -> dict[str, str]:
    with Session(node.engine) as s:
        return {row.series_uid: row.state for row in s.exec(select(Series))}


#: A complete series moves on to routing at once: "complete or later" is what assembly promises.
AFTER_ASSEMBLY = {SeriesState.COMPLETE, SeriesState.ROUTED, SeriesState.NOT_ROUTED}


def _completed(node) -> bool:
    states = set(_series_states(node).values())
    return bool(states) and states <= AFTER_ASSEMBLY


def _wait(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _send(node, files) -> None:
    for f in files:
        assert raw_store_file(node.scp.port, f) == 0


def test_series_completes_after_quiet_period(make_node, tmp_path):
    node = make_node(assembly={"series_quiet_s": 1.5})
    files = make_series(tmp_path / "in", 3)
    _send(node, files[:2])
    assert set(_series_states(node).values()) == {SeriesState.RECEIVING}
    time.sleep(0.8)
    _send(node, files[2:])  # restarts the quiet period
    time.sleep(0.9)
    assert set(_series_states(node).values()) == {SeriesState.RECEIVING}
    assert _wait(lambda: _completed(node))
    with Session(node.engine) as s:
        series = s.exec(select(Series)).one()
        study = s.exec(select(Study)).one()
    assert series.instance_count == 3
    assert series.completed_at is not None and series.completed_at >= series.last_received_at
    assert study.state == StudyState.COMPLETE


def test_late_instance_reopens_series(make_node, tmp_path):
    node = make_node(assembly={"series_quiet_s": 0.5})
    files = make_series(tmp_path / "in", 2)
    _send(node, files[:1])
    assert _wait(lambda: _completed(node))
    _send(node, files[1:])
    assert set(_series_states(node).values()) == {SeriesState.RECEIVING}
    assert _wait(lambda: _completed(node))


def test_half_received_series_completes_after_restart(tmp_path):
    """The series was quiet for longer than its quiet period while the node was down; it completes
    one quiet period after the restart, not at once (the sender may be about to resend)."""
    config = write_config(tmp_path, assembly={"series_quiet_s": 3.0, "poll_interval_s": 0.1})
    settings = load_settings(config)
    node = build_node(settings)
    node.start()
    node.runner.stop()  # the "crash": assembly never ran for this series
    files = make_series(tmp_path / "in", 2)
    _send(node, files)
    node.stop()
    time.sleep(3.2)
    assert set(_series_states(node).values()) == {SeriesState.RECEIVING}  # (engine reopens lazily)

    restarted = build_node(load_settings(config))
    restarted.start()
    started = time.monotonic()
    try:
        time.sleep(1.0)  # ten scheduler passes: the downtime must not count as quiet
        assert set(_series_states(restarted).values()) == {SeriesState.RECEIVING}
        assert _wait(lambda: _completed(restarted), 10)
        assert time.monotonic() - started >= 2.9
    finally:
        restarted.stop()


def test_study_grouping_waits_for_the_whole_study(make_node, tmp_path):
    node = make_node(assembly={"group_by": "study", "series_quiet_s": 0.2, "study_quiet_s": 1.5})
    study_uid = "1.2.826.0.1.3680043.8.498.1"
    ct = make_series(tmp_path / "ct", 1, study_uid=study_uid)
    mr = make_series(tmp_path / "mr", 1, template="MR_small.dcm", study_uid=study_uid)
    _send(node, ct)
    time.sleep(0.9)
    _send(node, mr)
    time.sleep(0.9)
    # series quiet period is long over, but the study is not yet quiet
    assert set(_series_states(node).values()) == {SeriesState.RECEIVING}
    assert _wait(lambda: _completed(node))
    with Session(node.engine) as s:
        study = s.exec(select(Study)).one()
    assert study.state == StudyState.COMPLETE
    assert sorted(study.modalities) == ["CT", "MR"]
