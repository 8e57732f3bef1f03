"""End to end through a running node (``pacs-node serve``): series without BodyPartExamined are
routed on their body region, and the evidence is recorded on the Series row (issue 13)."""

from __future__ import annotations

import pydicom
import yaml

from node.synth import generate_study
from tests.helpers import (
    node_db_url,
    query_db,
    raw_store_file,
    start_node_process,
    wait_for,
    write_config,
)


def test_a_running_node_records_the_body_region_evidence(tmp_path):
    series = {}
    for kind, region, seed in (("ct", "head", 21), ("ct", "abdomen", 22), ("mr", "pelvis", 23)):
        folder = tmp_path / "in" / f"{kind}-{region}"
        generate_study(
            kind,
            folder,
            seed,
            "normal",
            slices=4,
            size=128,
            region=region,
            body_part=False,
            write_masks=False,
        )
        files = sorted(folder.glob("*.dcm"))
        uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
        series[f"{kind}-{region}"] = (uid, files)

    config = write_config(tmp_path, assembly={"series_quiet_s": 0.5, "poll_interval_s": 0.1})
    proc = start_node_process(config, tmp_path / "node.log")
    try:
        port = int(yaml.safe_load(config.read_text())["dicom"]["port"])
        for _, files in series.values():
            for path in files:
                assert raw_store_file(port, path) == 0
        db = node_db_url(config)

        def notes() -> dict[str, tuple[str, str]] | None:
            rows = query_db(db, "SELECT series_uid, state, route_note FROM series")
            decided = {uid: (state, note) for uid, state, note in rows if note}
            return decided if len(decided) == len(series) else None

        decided = wait_for(notes, 60, "every series routed or recorded as not routed")
    finally:
        proc.terminate()
        proc.wait(20)

    head_state, head_note = decided[series["ct-head"][0]]
    assert head_state == "not routed"
    assert "body region HEAD (body region from pixels: head (closed bone ring" in head_note
    assert "agree" in head_note  # decided on several slices around the middle of the series

    # the abdomen goes to ct-liver by its pixels; this node loads no models, so it is recorded as
    # not routed for that reason, with the rule's evidence kept
    liver_state, liver_note = decided[series["ct-abdomen"][0]]
    assert liver_state == "not routed"
    assert liver_note.startswith(
        "not routed: rule 'ct-liver-by-region' names model ct-liver, which is not loaded"
    )
    assert "body region ABDOMEN (body region from pixels: abdomen (soft-tissue trunk" in liver_note

    mr_state, mr_note = decided[series["mr-pelvis"][0]]
    assert mr_state == "not routed" and "body region TRUNK (body region from pixels: trunk" in mr_note
