"""Issue 21 item 11: a node whose spool disk is below its free-space watermark refuses every
C-STORE (0xA700, nothing written) and so must not say it is ready: a load balancer or an operator
reading /readyz sends the modality elsewhere instead of into refusals."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from node.dicom import status
from tests.dicom.test_ingest import pynetdicom_store
from tests.helpers import make_series


def test_below_the_watermark_stores_are_refused_and_the_node_is_not_ready(make_node, tmp_path: Path) -> None:
    node = make_node(storage={"min_free_mb": 2**40})  # more than any disk has free
    (src,) = make_series(tmp_path / "in", 1)
    assert pynetdicom_store(node.scp.port, src) == status.OUT_OF_RESOURCES
    assert list(node.spool.root.rglob("*.dcm")) == []
    ready = TestClient(node.web_app()).get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["disk"] is False
    assert ready.json()["checks"]["dicom"] is True  # listening, yet it cannot take an image


def test_above_the_watermark_the_same_store_succeeds_and_the_node_is_ready(make_node, tmp_path: Path) -> None:
    node = make_node(storage={"min_free_mb": 0})
    (src,) = make_series(tmp_path / "in", 1)
    assert pynetdicom_store(node.scp.port, src) == status.SUCCESS
    assert TestClient(node.web_app()).get("/readyz").status_code == 200
