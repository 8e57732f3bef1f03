"""The HTML pages (node/web/pages.py): the list columns read as text, and a real browser renders
them: headless Chromium opens the overview, the worklist and a study page of a node that processed
phantom studies, the text that matters is checked in the rendered DOM, and screenshots are saved
(with PACS_NODE_SCREENSHOTS=docs, into docs/ for the README).

Chromium on the command line cannot send a bearer header, so the pages are served here by the
node's open loopback mode (no tokens configured); authentication is tested in test_auth.py.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import uvicorn

from node.web.factory import create_web_app
from tests.helpers import REPO, free_port, wait_port
from tests.web.conftest import chromium

WIDTH, HEIGHT = 1366, 900  # a laptop screen


@pytest.fixture(scope="module")
def base_url(processed):
    web = processed.node.settings.web.model_copy(update={"tokens": []})
    open_node = dataclasses.replace(
        processed.node, settings=processed.node.settings.model_copy(update={"web": web})
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_web_app(open_node), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_port(port)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _browse(url: str, profile: Path, screenshot: Path) -> str:
    """The DOM after scripts ran, and a screenshot of the page."""
    common = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}",
        "--virtual-time-budget=3000",
    ]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=60, check=True)
    subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=60, check=True)
    assert screenshot.stat().st_size > 10_000
    return dom.stdout


def test_pages_in_chromium(processed, base_url, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    profile = tmp_path / "profile"

    overview = _browse(f"{base_url}/", profile, shots / "overview.png")
    assert "PACSNODE" in overview
    assert "cxr 1.0.0" in overview  # models with versions
    assert "CPUExecutionProvider" in overview or "CUDAExecutionProvider" in overview
    assert "Outbox pending / failed" in overview and "Jobs queued / running" in overview
    assert "Studies / images last hour<b>3 / 3</b>" in overview
    assert processed.urgent in overview
    assert 'data-sideways-scroll="false"' in overview
    assert " UTC</time>" not in overview  # dates were rewritten in the browser's time zone

    worklist = _browse(f"{base_url}/worklist", profile, shots / "worklist.png")
    first = worklist.index(processed.urgent)
    assert first < worklist.index(processed.not_analysed) < worklist.index(processed.routine)
    assert "pneumonia" in worklist and ">urgent<" in worklist and ">not analysed<" in worklist
    assert 'data-sideways-scroll="false"' in worklist

    study = _browse(f"{base_url}/studies/{processed.urgent}", profile, shots / "study.png")
    assert "cxr 1.0.0" in study and "pneumonia" in study and "(positive)" in study
    assert "inferring" in study and "preprocessing" in study  # per-stage timings
    assert "/heatmaps/" in study and 'alt="heatmap 1 of job' in study
    assert 'data-sideways-scroll="false"' in study
    for text in (overview, worklist, study):
        for value in processed.patient_values:
            assert value not in text

    # PACS_NODE_SCREENSHOTS=docs refreshes the README's screenshots; otherwise they stay in tmp_path
    if target := os.environ.get("PACS_NODE_SCREENSHOTS"):
        folder = REPO / target
        folder.mkdir(exist_ok=True)
        shutil.copy(shots / "overview.png", folder / "status.png")
        shutil.copy(shots / "study.png", folder / "study.png")


def test_pages_show_the_list_columns_as_lists(processed):
    """Modalities and routed models (JSON lists in the store) read as text on the pages."""
    c = processed.client
    assert c.get(f"/api/v1/studies/{processed.urgent}").json()["modalities"] == ["DX"]
    page = c.get(f"/studies/{processed.urgent}").text
    assert " · DX · " in page and "</b> → cxr (image)" in page
    for html in (page, c.get("/studies").text, c.get("/").text):
        assert "[&#39;" not in html and '["' not in html and "DX" in html
