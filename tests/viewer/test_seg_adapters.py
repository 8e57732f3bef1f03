"""An SR with segment groups (TID 1411 referencing the job's SEG, the probability inferred from the
segment's outline) rehydrated by @cornerstonejs/adapters (OHIF 3.13's): the segment is recognised
as an outline with its finding name, and nothing throws."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from node.outputs.seg import build_seg
from node.outputs.sr import build_sr
from tests.outputs.fabricate import IDENTITY
from tests.outputs.test_seg import MASS, phantom_result
from tests.viewer.test_adapters import node_bin, rehydrate  # noqa: F401 (fixture)


def test_segment_group_rehydrates_as_an_outline(node_bin: str, tmp_path: Path) -> None:  # noqa: F811
    sources, result, _ = phantom_result(tmp_path / "ct")
    seg = build_seg(result, sources, IDENTITY)
    sr = build_sr(result, sources, IDENTITY, segmentation=seg)
    out = rehydrate(node_bin, sr, sources, tmp_path)
    (measurement,) = out["measurements"]
    assert measurement["toolType"] == "PlanarFreehandROI"
    assert measurement["description"] == MASS.meaning
    shown = max(result.images, key=lambda im: float(im.heatmaps[0].values.max()) if im.heatmaps else 0.0)
    assert measurement["referencedImageId"] == f"node:{shown.sop_instance_uid}:1"
    assert len(np.asarray(measurement["polyline"])) >= 3
    assert not [w for w in out["warnings"] if "Unable to generate tool state" in w], out["warnings"]
