"""The outbox's files are written atomically: a failed write leaves neither a ``.part`` file nor a
partial output, and fsync follows ``storage.fsync`` like the spool."""

from __future__ import annotations

import os
import warnings
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node import files
from node.runner import outbox
from node.settings import DestinationSettings
from node.store.tables import Job
from tests.helpers import sample_file
from tests.send.conftest import IDENTITY, chest_result, chest_source


def _output(tag: str, broken: bool = False) -> tuple[str, pydicom.Dataset]:
    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["outbox files", tag])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if broken:  # fails while the data set is written, after the File Meta and the first elements
        ds.add_new((0x0011, 0x0010), "LO", "test")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.add_new((0x0011, 0x1001), "US", "not a number")
    return "sc", ds


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_failed_output_write_leaves_no_part_file(tmp_path: Path) -> None:
    outbox_dir = tmp_path / "outbox"
    with pytest.raises(OSError, match="not an integer"):
        outbox.write_output_files(outbox_dir, 7, [_output("good"), _output("bad", broken=True)])
    left = _all_files(outbox_dir)
    assert not [name for name in left if name.endswith(".part")], left
    assert len(left) == 1 and left[0].startswith("7/sc-")  # the complete one, nothing of the other


def test_a_failed_write_keeps_the_file_already_there(tmp_path: Path) -> None:
    final = tmp_path / "out.bin"
    final.write_bytes(b"before")

    def fail(fh) -> None:
        fh.write(b"half")
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError):
        files.write_atomically(final, fail)
    assert _all_files(tmp_path) == ["out.bin"] and final.read_bytes() == b"before"
    files.write_atomically(final, lambda fh: fh.write(b"after"))
    assert _all_files(tmp_path) == ["out.bin"] and final.read_bytes() == b"after"


@pytest.mark.parametrize("fsync", [True, False])
def test_fsync_follows_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool) -> None:
    synced: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    written = outbox.write_output_files(tmp_path / "outbox", 3, [_output("a"), _output("b")], fsync=fsync)
    assert [pydicom.dcmread(p).SOPInstanceUID for _, _, p in written] == [
        ds.SOPInstanceUID for _, ds, _ in written
    ]
    assert len(synced) == (2 + 2 if fsync else 0)  # each file, then its folder and the outbox

    synced.clear()
    job = Job(
        id=3, key="m|series|1.2.3", model_id="m", level="series", study_uid="1.2.3", series_uids=["1.2.3.4"]
    )
    dests = [DestinationSettings(name="ris", kind="hl7", host="127.0.0.1", port=2575)]
    now = datetime(2026, 12, 1, tzinfo=UTC)
    messages = outbox.write_messages(
        tmp_path / "outbox", job, chest_result(), [chest_source()], IDENTITY, dests, now, fsync=fsync
    )
    assert len(messages) == 1 and messages[0].path.read_bytes().startswith(b"MSH|")
    assert len(synced) == (1 + 2 if fsync else 0)
