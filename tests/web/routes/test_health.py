"""GET /healthz and /readyz: alive, ready, and not ready while the DICOM port is down or the disk is
below its watermark."""

from __future__ import annotations

from tests.web.routes.support import client_of


def test_health_and_readiness(make_node):
    node = make_node()
    client = client_of(node)
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {
        "database": True,
        "database_writable": True,
        "dicom": True,
        "dicom_slots": True,
        "disk": True,
    }
    node.scp.stop()
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["checks"]["dicom"] is False


def test_not_ready_while_the_disk_is_below_its_watermark(make_node):
    """Below the free-space watermark every C-STORE is refused: the node must not say ready."""
    node = make_node(storage={"min_free_mb": 2**40})  # more than any disk has free
    ready = client_of(node).get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"] == {
        "database": True,
        "database_writable": True,
        "dicom": True,
        "dicom_slots": True,
        "disk": False,
    }
