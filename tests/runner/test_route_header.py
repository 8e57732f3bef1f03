"""One reader of the routing header for the scheduler and ``pacs-node route explain``: a file cut
anywhere in its header is "not routed", naming why, never an exception out of the routing pass
(pydicom raises struct.error and BytesLengthException for some cuts, which the scheduler's own
reader let through)."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pytest
from sqlmodel import Session

from node.pipeline.route import UnreadableHeader, explain_files, load_rules, read_route_dataset
from node.runner import jobs
from node.store.tables import Instance, Series, SeriesState, Study, StudyState, utcnow
from tests.helpers import REPO, make_test_engine, sample_file

SOURCE = Path(sample_file("CT_small.dcm")).read_bytes()


def _cut(tmp_path: Path, size: int) -> Path:
    path = tmp_path / f"cut-{size}.dcm"
    path.write_bytes(SOURCE[:size])
    return path


def _raised(path: Path) -> str | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the cut values it still reads
        try:
            read_route_dataset(path)
        except UnreadableHeader as exc:
            return str(exc)
    return None


def test_every_cut_of_a_header_is_read_or_refused_by_name(tmp_path: Path) -> None:
    reasons = [_raised(_cut(tmp_path, size)) for size in range(0, 1400)]
    refused = [r for r in reasons if r is not None]
    assert any("struct.error" in r or "error:" in r for r in refused), refused
    assert any("BytesLengthException" in r for r in refused), refused
    assert any(r.startswith("not a DICOM file") for r in refused)
    assert _raised(tmp_path / "absent.dcm") == "no such file"


# the cuts pydicom answers with struct.error (152) and BytesLengthException (141)
@pytest.mark.parametrize("size", [141, 152])
def test_a_series_whose_first_file_has_a_truncated_header_is_not_routed(tmp_path: Path, size: int) -> None:
    path = _cut(tmp_path, size)
    engine = make_test_engine(tmp_path)
    now = utcnow()
    with Session(engine) as s:
        s.add(Study(study_uid="1.2", first_received_at=now, last_received_at=now, state=StudyState.COMPLETE))
        s.flush()
        s.add(
            Series(
                series_uid="1.2.3",
                study_uid="1.2",
                state=SeriesState.COMPLETE,
                first_received_at=now,
                last_received_at=now,
            )
        )
        s.flush()
        s.add(
            Instance(
                sop_instance_uid="1.2.3.4",
                series_uid="1.2.3",
                study_uid="1.2",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                byte_size=size,
                path=path.name,
                received_at=now,
                sha256=hashlib.sha256(path.read_bytes()).hexdigest(),  # received so: it is intact
            )
        )
        s.commit()
    rules = load_rules(REPO / "config" / "routes.yaml")
    with Session(engine) as s, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert jobs.route_complete_series(s, rules, lambda m: True, tmp_path, now) == 1
        s.commit()
    with Session(engine) as s:
        series = s.get(Series, "1.2.3")
        assert series.state == SeriesState.NOT_ROUTED
        assert series.route_note.startswith(
            "not routed: its first instance cannot be read (not a readable DICOM"
        )
    ((decision, _),) = [(d, p) for p, d in explain_files(rules, [path])]
    assert decision.reason.startswith("not routed: not a readable DICOM file")
