"""OHIF's built viewer served on loopback, with Orthanc's DICOMweb behind the same origin.

The ``@ohif/app`` npm package ships the production build (``dist/``); its workspace dependencies
are not all published, so the package is not installed but unpacked (``npm pack``). The server
answers ``/app-config.js`` with a configuration whose one data source is Orthanc's DICOMweb,
proxies ``/dicom-web/...`` to Orthanc (the viewer and its data share an origin: no CORS), serves
the files of ``dist/`` and, for the viewer's own routes (``/viewer?StudyInstanceUIDs=...``), its
``index.html``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from tests.helpers import free_port, need, wait_port

HERE = Path(__file__).resolve().parent
OHIF_VERSION = "3.13.2"
DIST = HERE / "ohif" / "dist"

APP_CONFIG = """
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (tests)',
        name: 'orthanc',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        if os.environ.get("CI"):
            pytest.fail("npm is not installed; the OHIF test needs Node.js and npm")
        pytest.skip("npm is not installed")
    return npm


def ensure_ohif() -> Path:
    """OHIF's ``dist/`` and playwright-core under tests/ohif, fetched from the npm registry on
    first use (``npm pack @ohif/app`` then unpacked; ``npm ci`` for the driver)."""
    npm = _npm()
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=HERE, check=True, timeout=600)
    if not (DIST / "index.html").is_file():
        work = HERE / "ohif"
        work.mkdir(exist_ok=True)
        proc = subprocess.run(
            [npm, "pack", f"@ohif/app@{OHIF_VERSION}", "--pack-destination", str(work)],
            cwd=work,
            check=True,
            timeout=600,
            capture_output=True,
            text=True,
        )
        tarball = work / proc.stdout.strip().splitlines()[-1]
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            for m in members:
                m.name = m.name.removeprefix("package/")
            tar.extractall(work, members=members, filter="data")
        tarball.unlink()
    return DIST


def _app(dist: Path, orthanc_url: str) -> Starlette:
    client = httpx.AsyncClient(base_url=orthanc_url, timeout=60)

    async def config(request: Request) -> Response:
        return Response(APP_CONFIG, media_type="application/javascript")

    async def dicomweb(request: Request) -> Response:
        upstream = await client.request(
            request.method,
            request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            headers={k: v for k, v in request.headers.items() if k.lower() in ("accept", "content-type")},
            content=await request.body(),
        )
        headers = {
            k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "content-disposition")
        }
        return Response(upstream.content, status_code=upstream.status_code, headers=headers)

    async def files(request: Request) -> Response:
        path = (dist / request.path_params["path"]).resolve()
        if path.is_file() and dist in path.parents:
            return FileResponse(path)
        return FileResponse(dist / "index.html")

    return Starlette(
        routes=[
            Route("/app-config.js", config),
            Route("/dicom-web/{rest:path}", dicomweb, methods=["GET", "POST"]),
            Route("/{path:path}", files),
        ]
    )


class OhifServer:
    """The viewer on a free loopback port, in a thread."""

    def __init__(self, orthanc_http_port: int) -> None:
        dist = ensure_ohif()
        self.port = free_port()
        app = _app(dist, f"http://127.0.0.1:{orthanc_http_port}")
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_port(self.port, 20)
        time.sleep(0.1)

    @property
    def url(self) -> str:
        """The viewer's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop the server thread."""
        self._server.should_exit = True
        self._thread.join(10)


def open_in_ohif(viewer: str, study_uid: str, screenshot: Path, modality: str = "SR") -> dict:
    """Open a study in the viewer with headless Chromium (open_sr.mjs), load the series of
    ``modality`` into the viewport and return what the page did (JSON: errors, steps, shapes...)."""
    node_js = shutil.which("node")
    if node_js is None:
        if os.environ.get("CI"):
            pytest.fail("Node.js is not installed")
        pytest.skip("Node.js is not installed")
    need("chromium")
    proc = subprocess.run(
        [node_js, str(HERE / "open_sr.mjs"), viewer, study_uid, str(screenshot)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=HERE,
        env={**os.environ, "OPEN_MODALITY": modality},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
