"""OHIF 3.13 with a segmentation job's outputs: a CT phantom with a liver mass goes Orthanc -> node
(routed to ct-liver-seg) -> Orthanc (SEG + SR + mask SC); OHIF, reading Orthanc over DICOMweb in
headless Chromium, opens the SR (its TID 1411 segment group is drawn as the segment's outline,
with no page error) and the SEG (shown as a labelmap over the CT: coloured pixels on screen).

Set ``PACS_NODE_OHIF_SEG_SCREENSHOT=docs/ohif-seg.png`` to keep the SEG screenshot.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from node.app import build_node
from node.settings import load_settings
from node.store.tables import JobState
from node.synth import generate_study
from tests.e2e.test_orthanc import node_config, wait_jobs
from tests.e2e.test_segmentation_orthanc import ROUTES
from tests.helpers import free_port
from tests.ohif.server import OhifServer, open_in_ohif
from tests.orthanc import Orthanc

pytestmark = pytest.mark.slow
_ABOUT_SR_OR_SEG = re.compile(
    r"ReferencedSOPSequence|NaN|SR|SEG|[Ss]egment|[Mm]easurement|hydrat|annotation|SCOORD|TID"
)


def _coloured_fraction(png: Path) -> float:
    """Share of pixels whose colour channels differ clearly (a labelmap over a grey CT)."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    return float((spread > 60).mean())


def test_ohif_opens_the_seg_and_the_sr_of_a_segmentation_job(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    orthanc_port = free_port()
    destination = {
        "name": "orthanc",
        "ae_title": "ORTHANC",
        "host": "127.0.0.1",
        "port": orthanc_port,
        "backoff_initial_s": 0.5,
        "backoff_max_s": 1.0,
    }
    config = node_config(
        tmp_path, orthanc_port, destinations=[destination], routing={"rules_file": str(routes)}
    )
    node = build_node(load_settings(config))
    node.start()
    orthanc = Orthanc(tmp_path / "orthanc", node.scp.port, dicom_port=orthanc_port, dicomweb=True)
    viewer = None
    try:
        truth = generate_study(
            "ct", tmp_path / "ct", seed=7, label="malignant", write_masks=False, slices=16, size=256
        )
        (study,) = orthanc.upload(sorted((tmp_path / "ct").glob("*.dcm")))
        orthanc.send_to_node(study)
        (job,) = wait_jobs(node, {truth.study_instance_uid}, timeout=300)
        assert job.state == JobState.DONE, job.error
        orthanc.wait_for_series(
            study, lambda ss: {"SR", "SEG"} <= {s["MainDicomTags"].get("Modality") for s in ss}, timeout=120
        )
        viewer = OhifServer(orthanc.http_port)
        sr_shot = tmp_path / "ohif-sr.png"
        seen_sr = open_in_ohif(viewer.url, truth.study_instance_uid, sr_shot, "SR")
        seg_shot = Path(
            os.environ.get("PACS_NODE_OHIF_SEG_SCREENSHOT") or tmp_path / "ohif-seg.png"
        ).resolve()
        seen_seg = open_in_ohif(viewer.url, truth.study_instance_uid, seg_shot, "SEG")
    finally:
        if viewer is not None:
            viewer.stop()
        orthanc.stop()
        node.stop()
    for seen in (seen_sr, seen_seg):
        where = json.dumps(seen, indent=1)[:4000]
        bad = [
            e
            for e in seen["errors"]
            if e.startswith("pageerror") or _ABOUT_SR_OR_SEG.search(e.split(" at ")[0])
        ]
        assert not bad, where
        assert "SR opened" in seen["steps"], where
        assert seen["brightness"] > 5, f"the CT is not on screen: {where}"
    assert seen_sr["svgShapes"] >= 1, f"no outline drawn from the SR: {json.dumps(seen_sr)[:3000]}"
    assert _coloured_fraction(seg_shot) > 0.0005, "no labelmap colour on screen"
