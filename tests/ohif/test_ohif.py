"""OHIF, the most used web viewer, opens the node's SR: a real CR chest radiograph goes Orthanc ->
node -> Orthanc (SR + heatmap SC), then OHIF 3.13's built viewer, reading Orthanc over DICOMweb in
headless Chromium, loads the SR into its viewport, hydrates its measurements and draws the
hotspot outline with the finding's name, without a page error.

Set ``PACS_NODE_OHIF_SCREENSHOT=docs/ohif-sr.png`` to keep the screenshot.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pydicom
import pytest

from node.app import build_node
from node.settings import load_settings
from node.store.tables import JobState
from tests.e2e.test_orthanc import node_config, wait_jobs
from tests.helpers import free_port
from tests.ohif.server import OhifServer, open_in_ohif
from tests.orthanc import Orthanc
from tests.realfiles.corpus import derived

pytestmark = pytest.mark.slow


def _no_pixel_spacing(ds: pydicom.Dataset) -> None:
    del ds.PixelSpacing


def test_ohif_opens_the_sr_of_a_real_cr_and_draws_its_outline(tmp_path: Path) -> None:
    orthanc_port = free_port()
    destination = {
        "name": "orthanc",
        "ae_title": "ORTHANC",
        "host": "127.0.0.1",
        "port": orthanc_port,
        "parametric_map": False,
        "backoff_initial_s": 0.5,
        "backoff_max_s": 1.0,
    }
    node = build_node(load_settings(node_config(tmp_path, orthanc_port, destinations=[destination])))
    node.start()
    orthanc = Orthanc(tmp_path / "orthanc", node.scp.port, dicom_port=orthanc_port, dicomweb=True)
    viewer = None
    try:
        # OHIF itself cannot show the file as the vendor wrote it: with PixelSpacing 0\\0 its image
        # plane has zero spacing (a black image, NaN coordinates, with or without an SR), so the
        # corpus variant without PixelSpacing, which the node analyses the same way
        path = derived("RG1_J2KI.dcm", _no_pixel_spacing)(tmp_path)
        source = pydicom.dcmread(path, stop_before_pixels=True)
        (study,) = orthanc.upload([path])
        orthanc.send_to_node(study)
        (job,) = wait_jobs(node, {str(source.StudyInstanceUID)}, timeout=300)
        assert job.state == JobState.DONE, job.error
        result = job.recorded_result()
        assert result is not None
        findings = result.findings
        positive = [f.label for f in findings if f.positive]
        assert positive, f"the real CR has no positive finding to draw: {findings}"
        orthanc.wait_for_series(
            study, lambda ss: "SR" in {s["MainDicomTags"].get("Modality") for s in ss}, timeout=120
        )
        viewer = OhifServer(orthanc.http_port)
        shot = Path(os.environ.get("PACS_NODE_OHIF_SCREENSHOT") or tmp_path / "ohif.png")
        seen = open_in_ohif(viewer.url, str(source.StudyInstanceUID), shot.resolve())
    finally:
        if viewer is not None:
            viewer.stop()
        orthanc.stop()
        node.stop()
    brief = {
        **seen,
        "svgPoints": [p[:120] for p in seen.get("svgPoints", [])[:4]],
        "body": seen.get("body", "")[:600],
    }
    where = json.dumps(brief, indent=1)[:6000]
    shot.with_suffix(".json").write_text(where)  # what the viewer did, beside the screenshot
    # any uncaught page error fails, and any console error about the SR, its measurements or their
    # coordinates; OHIF's own image-loading retries may log (IMAGE_LOAD_ERROR on a slow machine),
    # which the on-screen check below covers
    about_sr = re.compile(r"ReferencedSOPSequence|NaN|SR|[Mm]easurement|hydrat|annotation|SCOORD|TID", re.S)
    bad = [e for e in seen["errors"] if e.startswith("pageerror") or about_sr.search(e.split(" at ")[0])]
    assert not bad, where
    assert "SR opened" in seen["steps"], where
    assert seen["brightness"] > 20, f"the radiograph is not on screen (mean canvas value): {where}"
    assert seen["svgShapes"] >= 1, f"no outline drawn: {where}"
    numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", " ".join(seen["svgPoints"]))]
    assert len(numbers) >= 6 and "NaN" not in " ".join(seen["svgPoints"]), f"outline has no points: {where}"
    meanings = {f.label.lower() for f in findings if f.positive}
    shown = (seen.get("body", "") + " ".join(t or "" for t in seen.get("svgTexts", []))).lower()
    assert any(m in shown for m in meanings), f"the finding's name ({meanings}) is not shown: {where}"
