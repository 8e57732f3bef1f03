"""The "Analyse a file" page: DICOM and photograph uploads through the node's own analysis, the
progress stream (server-sent events) and its order, the result page and report, every refusal with
its status and message, the bounded result store, and the study page's job progress stream."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from html import unescape
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import uvicorn
import yaml
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.encaps import encapsulate
from sqlmodel import Session

from node.app import Node, build_node
from node.settings import load_settings
from node.store.tables import Job, JobState, Study, utcnow
from node.synth import generate_study
from node.web.analyse import STAGES, AnalysisStore
from node.web.photo import KINDS
from tests.helpers import REPO, add_job, free_port, sample_file, wait_port, write_config
from tests.inference.conftest import example_manifest_dict, make_cam_model
from tests.web.conftest import READ_TOKEN, TOKENS, UID_ROOT, chromium, cxr_models, picture

MAX_UPLOAD_MB = 4


def photo_model(models: Path) -> None:
    """A tiny colour model (photo-demo): 3 x 32 x 32 RGB input, label 'red' looks at the red
    channel, 'green' at green minus blue (tests.inference's CAM model), with a CAM heatmap."""
    blob = make_cam_model(size=32, pool=4, channels=3)
    data = example_manifest_dict()
    data.update(
        id="photo-demo",
        name="Colour photograph demo classifier",
        intended_use="Research only: a demonstration on colour photographs (the tests' model).",
    )
    data["model"]["sha256"] = hashlib.sha256(blob).hexdigest()
    data["preprocessing"] = [
        {"op": "resize", "size": [32, 32], "interpolation": "area"},
        {"op": "normalize", "mean": [0.2, 0.2, 0.2], "std": [0.25, 0.25, 0.25], "max_pixel_value": 255},
    ]
    data["labels"] = [
        {
            "name": "red",
            "index": 0,
            "code": {"value": "C-1", "scheme_designator": "99PACSNODE", "meaning": "Red"},
            "threshold": 0.5,
        },
        {
            "name": "green",
            "index": 1,
            "code": {"value": "C-2", "scheme_designator": "99PACSNODE", "meaning": "Green"},
            "threshold": 0.7,
        },
    ]
    data.pop("routing", None)
    folder = models / "photo-demo"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(blob)
    (folder / "manifest.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def routes(folder: Path) -> Path:
    """The repository's routing rules with rules for the photographs (OP, XC, GM -> photo-demo)
    first, and ultrasound to the chest model (which cannot take colour: a failure after routing)."""
    rules = yaml.safe_load((REPO / "config" / "routes.yaml").read_text())
    rules["rules"][:0] = [
        {
            "name": "photo-fundus",
            "description": "a fundus photograph",
            "match": {"modality": "OP"},
            "models": "photo-demo",
            "grouping": "image",
        },
        {
            "name": "photo-derm",
            "description": "dermoscopy",
            "match": {"modality": "XC", "series_description": "dermoscopy"},
            "models": "photo-demo",
            "grouping": "image",
        },
        {
            "name": "photo-smear",
            "description": "a blood smear",
            "match": {"modality": ["GM", "SM"]},
            "models": "photo-demo",
            "grouping": "image",
        },
        {
            "name": "us-to-cxr",
            "description": "ultrasound sent to the chest model (wrong on purpose)",
            "match": {"modality": "US"},
            "models": "cxr",
            "grouping": "image",
        },
    ]
    path = folder / "routes.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


@dataclass
class Page:
    node: Node
    client: TestClient  # signed in with the cookie, as a browser is
    folder: Path

    def csrf(self) -> str:
        html = self.client.get("/analyse").text
        return re.search(r'name="csrf" value="([^"]+)"', html).group(1)

    def upload(self, data: bytes, kind: str = "dicom", name: str = "upload.bin", **fields: str):
        form = {"csrf": self.csrf(), "kind": kind, **fields}
        return self.client.post(
            "/analyse",
            data=form,
            files={"file": (name, data, "application/octet-stream")},
            follow_redirects=False,
        )


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    folder = tmp_path_factory.mktemp("analyse-page")
    models = cxr_models(folder)
    photo_model(models)
    config = write_config(
        folder,
        models={"directory": str(models)},
        routing={"rules_file": str(routes(folder))},
        web={"tokens": TOKENS, "max_upload_mb": MAX_UPLOAD_MB},
        outputs={"uid_root": UID_ROOT},
    )
    node = build_node(load_settings(config))
    node.start()
    try:
        client = TestClient(node.web_app(), cookies={"pacs_node_token": READ_TOKEN})
        generate_study("cxr", folder / "sick", seed=11, label="pneumonia", scale=0.5)
        yield Page(node, client, folder)
    finally:
        node.stop()


def events(client: TestClient, url: str, **headers: str) -> list[tuple[str, str, dict]]:
    """The (id, event, data) of a server-sent event stream, read to its end."""
    with client.stream("GET", url, headers=headers) as answer:
        assert answer.status_code == 200, answer.read()
        assert answer.headers["content-type"].startswith("text/event-stream")
        text = "".join(answer.iter_text())
    out = []
    for block in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":")
        )
        if "event" in fields:
            out.append((fields.get("id", ""), fields["event"], json.loads(fields["data"])))
    return out


def analysed(page: Page, answer) -> tuple[str, list[tuple[str, str, dict]]]:
    """Follow an accepted upload: its result URL and its progress events."""
    assert answer.status_code == 303, answer.text
    url = answer.headers["location"]
    assert re.fullmatch(r"/analyse/[A-Za-z0-9_-]{16,}", url)
    return url, events(page.client, url + "/events")


def test_form_needs_sign_in_and_is_in_the_nav(page):
    anonymous = TestClient(page.node.web_app())
    answer = anonymous.get("/analyse", follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/login?next=/analyse"
    html = page.client.get("/").text
    assert '<a href="/analyse"' in html
    form = page.client.get("/analyse").text
    assert 'enctype="multipart/form-data"' in form and 'name="csrf"' in form
    for key in KINDS:
        assert f'value="{key}"' in form


def test_dicom_upload_streams_its_steps_in_order_then_shows_the_result(page):
    cxr = sorted((page.folder / "sick").glob("*.dcm"))[0]
    url, steps = analysed(page, page.upload(cxr.read_bytes(), "dicom", "chest.dcm"))
    stages = [s for _, s, _ in steps]
    assert stages == ["received", "decoded", "routed", "preprocessing", "inference", "heatmap", "done"]
    assert [i for i, _, _ in steps] == [str(n) for n in range(len(steps))]
    assert all(s in STAGES for s in stages)
    by_stage = {s: d for _, s, d in steps}
    assert by_stage["decoded"]["message"].startswith("DX, Digital X-Ray Image Storage - For Presentation, ")
    assert by_stage["routed"]["message"].startswith("rule 'cxr") and "-> cxr" in by_stage["routed"]["message"]
    assert "pneumonia" in by_stage["done"]["message"]
    ats = [d["at"] for _, _, d in steps]
    assert ats == sorted(ats)
    result = page.client.get(url)
    assert result.status_code == 200
    html = result.text
    assert "Classification report" in html and 'id="print"' in html
    row = re.search(r"<tr class=\"positive\"><td>pneumonia.*?</tr>", html, re.S)
    assert row, "pneumonia is a positive finding"
    assert "0.50" in row.group(0)  # its threshold
    assert "research use only" in html
    image = re.search(r'src="(/analyse/[^"]+/images/[^"]+\.png)"', html).group(1)
    png = page.client.get(image)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    # resumed after step 3: the browser's EventSource sends Last-Event-ID on reconnecting
    resumed = events(page.client, url + "/events", **{"Last-Event-ID": "3"})
    assert [i for i, _, _ in resumed] == [str(n) for n in range(4, len(steps))]


def test_fundus_photograph_is_wrapped_and_analysed_by_the_colour_model(page):
    url, steps = analysed(page, page.upload(picture(), "fundus", "eye.jpg", eye="L"))
    stages = [s for _, s, _ in steps]
    assert stages == ["received", "decoded", "routed", "preprocessing", "inference", "heatmap", "done"]
    by_stage = {s: d["message"] for _, s, d in steps}
    assert "JPEG picture, 96x64" in by_stage["received"] and "Ophthalmic Photography" in by_stage["received"]
    assert by_stage["decoded"].startswith("OP, Ophthalmic Photography 8 Bit Image Storage, 96x64")
    assert "RGB" in by_stage["decoded"]
    assert "rule 'photo-fundus' -> photo-demo" in by_stage["routed"]
    html = page.client.get(url).text
    # a red picture: 'red' (red channel) is positive, 'green' (green minus blue) is not
    assert re.search(r'<tr class="positive"><td>red', html)
    assert re.search(r"<tr class=\"\"><td>green", html)
    assert "Colour photograph demo classifier" in html


def test_dermoscopy_png_and_smear_are_routed_by_their_kind(page):
    for kind, rule in (("dermoscopy", "photo-derm"), ("microscopy", "photo-smear")):
        _, steps = analysed(page, page.upload(picture((40, 160, 60), fmt="PNG"), kind, "p.png"))
        routed = next(d["message"] for _, s, d in steps if s == "routed")
        assert f"rule '{rule}' -> photo-demo" in routed, routed
        assert steps[-1][1] == "done"


def _refused(answer, status: int, text: str) -> None:
    assert answer.status_code == status, answer.text[:500]
    message = re.search(r'<p class="bad refusal" role="alert" id="refusal">(.*?)</p>', answer.text, re.S)
    assert message, "the form shows the refusal"
    assert text in unescape(message.group(1)), message.group(1)


def _edited(edit) -> bytes:
    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    edit(ds)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_not_an_image(page):
    _refused(page.upload(b"notes, not an image\n" * 20, "dicom", "notes.txt"), 400, "not a DICOM file")
    _refused(page.upload(b"", "dicom", "empty.dcm"), 400, "the file is empty")


def test_picture_without_its_kind(page):
    _refused(page.upload(picture(), "dicom", "x.jpg"), 400, "this is a JPEG picture, not a DICOM file")


def test_broken_picture(page):
    _refused(page.upload(b"\xff\xd8\xff\xe0" + b"\x00" * 200, "fundus", "x.jpg"), 400, "cannot be decoded")


def test_too_large(page):
    big = b"\0" * (MAX_UPLOAD_MB * 2**20 + 1)
    _refused(page.upload(big, "dicom", "big.dcm"), 413, f"larger than the limit of {MAX_UPLOAD_MB} MB")


def test_unsupported_transfer_syntax(page):
    def mpeg2(ds):
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
        ds.PixelData = encapsulate([ds.PixelData])
        ds["PixelData"].VR = "OB"

    _refused(page.upload(_edited(mpeg2)), 415, "unsupported transfer syntax 1.2.840.10008.1.2.4.100")


def test_unsupported_photometric(page):
    def hsv(ds):
        ds.PhotometricInterpretation = "HSV"  # retired, no decoder takes it

    _refused(page.upload(_edited(hsv)), 415, "unsupported photometric interpretation 'HSV'")

    def rgb_of_one_sample(ds):
        ds.PhotometricInterpretation = "RGB"

    _refused(page.upload(_edited(rgb_of_one_sample)), 415, "RGB with 1 samples per pixel (it has 3)")


def test_no_route_says_why(page):
    def xa(ds):
        ds.Modality = "XA"

    _refused(page.upload(_edited(xa)), 422, "no route for this image (modality XA)")
    # a picture of no known kind becomes a secondary capture, which the rules exclude
    _refused(page.upload(picture(), "other", "x.png"), 422, "excluded by 'derived-secondary'")


def test_model_that_cannot_take_the_image_fails_on_the_result_page(page):
    rgb_us = sample_file("US1_UNCR.dcm").read_bytes()  # RGB ultrasound, routed to the chest model
    url, steps = analysed(page, page.upload(rgb_us))
    assert [s for _, s, _ in steps][-1] == "failed"
    assert "routed" in [s for _, s, _ in steps]
    message = steps[-1][2]["message"]
    assert "cxr" in message
    result = page.client.get(url)
    assert result.status_code == 422
    assert "refused or failed (HTTP 422)" in result.text and message.split(":")[0] in result.text


def test_csrf_is_required(page):
    answer = page.client.post(
        "/analyse",
        data={"kind": "dicom"},
        files={"file": ("x.dcm", b"x", "application/dicom")},
        follow_redirects=False,
    )
    _refused(answer, 403, "the form had expired")


def test_unknown_analysis(page):
    assert page.client.get("/analyse/nosuchanalysisid00").status_code == 404
    assert page.client.get("/analyse/nosuchanalysisid00/events").status_code == 404


def test_store_is_bounded_in_count_bytes_and_time():
    store = AnalysisStore(ttl_s=60, max_items=2, max_bytes=1000, max_running=2)
    a, b = store.new("a", "dicom"), store.new("b", "dicom")
    assert store.new("c", "dicom") is None  # two running already
    a.fail(422, "x")
    store.sized(a, 10)
    b.fail(422, "y")
    store.sized(b, 10)
    c = store.new("c", "dicom")
    assert c is not None and store.get(a.id) is None and store.get(b.id) is not None  # oldest finished went
    c.fail(500, "z")
    store.sized(c, 2000)  # over the bytes: the oldest finished go until under it
    assert store.get(b.id) is None
    short = AnalysisStore(ttl_s=0.05)
    d = short.new("d", "dicom")
    time.sleep(0.1)
    assert short.get(d.id) is None


def test_study_page_streams_job_state_changes(page):
    study_uid = "1.2.826.0.1.3680043.8.498.77.1"
    job_id = _running_job(page.node, study_uid, "analyse-page-events")
    html = page.client.get(f"/studies/{study_uid}").text
    block = re.search(r'<section id="job-progress"[^>]*>', html).group(0)
    assert f'data-events="/studies/{study_uid}/events"' in block and "hidden" not in block
    received: list = []
    reader = threading.Thread(
        target=lambda: received.extend(events(page.client, f"/studies/{study_uid}/events"))
    )
    reader.start()
    for state in (JobState.INFERRING, JobState.DONE):
        time.sleep(1.6)
        _set_state(page.node, job_id, state)
    reader.join(30)
    assert not reader.is_alive()
    kinds = [(e, d.get("state")) for _, e, d in received]
    assert kinds == [("job", "queued"), ("job", "inferring"), ("job", "done"), ("idle", None)], kinds
    html = page.client.get(f"/studies/{study_uid}").text
    assert re.search(r'<section id="job-progress"[^>]*hidden', html)
    assert page.client.get("/studies/1.2.3.4.404/events").status_code == 404


def playwright_node() -> str:
    """Node.js with playwright-core (tests/ohif's, installed there with ``npm ci`` on first use, as
    the OHIF tests do) and Chromium; skip outside CI when one is missing, fail in CI."""
    node_js, npm = shutil.which("node"), shutil.which("npm")
    if node_js is None or npm is None:
        if os.environ.get("CI"):
            pytest.fail("Node.js and npm are needed for the browser tests")
        pytest.skip("Node.js or npm is not installed")
    chromium()
    ohif = REPO / "tests" / "ohif"
    if not (ohif / "node_modules" / "playwright-core").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=ohif, check=True, timeout=600)
    return node_js


def fundus_picture(path: Path) -> Path:
    """A fundus-like photograph (orange disc on black, a pale optic disc, dark vessels, a few
    bright spots) as JPEG, for the browser test and its screenshot."""
    h, w = 480, 560
    rgb = np.zeros((h, w, 3), np.uint8)
    cv2.circle(rgb, (w // 2, h // 2), 220, (196, 86, 42), -1)
    cv2.circle(rgb, (w // 2 + 95, h // 2 - 10), 34, (246, 214, 140), -1)
    rng = np.random.default_rng(3)
    for _ in range(9):
        angle = rng.uniform(0, 2 * np.pi)
        end = (int(w / 2 + 95 + 210 * np.cos(angle)), int(h / 2 - 10 + 190 * np.sin(angle)))
        cv2.line(rgb, (w // 2 + 95, h // 2 - 10), end, (120, 30, 24), 4)
    for _ in range(6):
        cv2.circle(rgb, (int(rng.uniform(170, 330)), int(rng.uniform(150, 330))), 6, (250, 236, 160), -1)
    rgb = cv2.GaussianBlur(rgb, (0, 0), 1.5)
    Image.fromarray(rgb).save(path, "JPEG", quality=92)
    return path


def browser_upload(base: str, picture: Path, kind: str, shot: Path, report: Path) -> dict:
    """Run analyse_upload.mjs in headless Chromium against ``base``: sign in, upload ``picture``
    as ``kind``, follow the progress page to the result, screenshot it (screen and print media)
    to ``shot`` and ``report``. Returns what the script saw (its JSON)."""
    node_js = playwright_node()
    proc = subprocess.run(
        [
            node_js,
            str(Path(__file__).parent / "analyse_upload.mjs"),
            base,
            READ_TOKEN,
            str(picture),
            kind,
            str(shot),
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serve(app) -> tuple[uvicorn.Server, threading.Thread, str]:  # noqa: ANN001
    """``app`` on a loopback port (uvicorn in a thread): the server, its thread and its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_port(port)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(page):
    """The page fixture's node on a loopback port (uvicorn), for a real browser."""
    server, thread, base = serve(page.node.web_app())
    yield base
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def bundled_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A node with the bundled models (models/onnx) and the shipped config/routes.yaml, its web
    server on a loopback port."""
    folder = tmp_path_factory.mktemp("analyse-bundled")
    config = write_config(
        folder,
        models={"directory": str(REPO / "models" / "onnx"), "providers": ["CPUExecutionProvider"]},
        web={"tokens": TOKENS, "max_upload_mb": MAX_UPLOAD_MB},
        outputs={"uid_root": UID_ROOT},
    )
    node = build_node(load_settings(config))
    node.start()
    try:
        server, thread, base = serve(node.web_app())
        yield base
        server.should_exit = True
        thread.join(timeout=10)
    finally:
        node.stop()


def fundus_phantom_picture(path: Path) -> Path:
    """node.synth's fundus phantom with referable DR (microaneurysms, exudates) as a JPEG
    photograph, the kind of picture the bundled fundus-dr model was trained on."""
    from node.synth import render_study

    (image,) = render_study("fundus", seed=20, label="referable_dr", size=512).images
    Image.fromarray(np.asarray(image.pixels, np.uint8)).save(path, "JPEG", quality=92)
    return path


@pytest.mark.slow
def test_browser_fundus_phantom_through_the_bundled_model(bundled_served, tmp_path):
    """A fundus phantom photograph uploaded in Chromium goes through the shipped 'fundus' rule to
    the bundled fundus-dr model: the result page shows referable DR found with its SNOMED CT code,
    the heatmap and the route. PACS_NODE_SCREENSHOTS=docs refreshes docs/analyse-result.png and
    docs/analyse-report.png from this test; otherwise they stay in tmp_path."""
    target = Path(os.environ.get("PACS_NODE_SCREENSHOTS") or tmp_path)
    shot, report = target / "analyse-result.png", target / "analyse-report.png"
    picture = fundus_phantom_picture(tmp_path / "fundus-phantom.jpg")
    seen = browser_upload(bundled_served, picture, "fundus", shot, report)
    where = json.dumps(seen, indent=1)[:4000]
    assert not seen["errors"], where
    assert [e["type"] for e in seen["events"]][-1] == "done", where
    text = seen["report"]
    assert "Colour fundus referable diabetic retinopathy reference classifier" in text, where
    assert "rule 'fundus' -> fundus-dr" in text, where
    row = re.search(
        r"referable_dr Diabetic retinopathy \(SCT 4855003\)\s+(0\.\d{3}|1\.000)\s+0\.48\s+(\w+)", text
    )
    assert row and row.group(2) == "positive", where
    assert any(i.startswith("heatmap for referable_dr") and not i.endswith(" 0x0") for i in seen["images"]), (
        where
    )
    assert shot.stat().st_size > 10_000 and report.stat().st_size > 10_000


@pytest.mark.slow
def test_browser_uploads_a_photograph_and_gets_the_result_page(page, served, tmp_path):
    # the screenshots in docs/ come from the bundled model (the test below); these stay here
    shot, report = tmp_path / "analyse-result.png", tmp_path / "analyse-report.png"
    seen = browser_upload(served, fundus_picture(tmp_path / "fundus.jpg"), "fundus", shot, report)
    where = json.dumps(seen, indent=1)[:4000]
    assert not seen["errors"], where
    assert seen["urls"][:2] == ["/login", "/analyse"], where
    assert any(re.fullmatch(r"/analyse/[A-Za-z0-9_-]+", u) for u in seen["urls"]), where
    if seen["events"]:
        # the progress page's event stream as its script received it: every step, in order
        streamed = [e["type"] for e in seen["events"]]
        assert streamed == [*STAGES[:-2], "done"], where
        assert all(e["data"]["stage"] == e["type"] for e in seen["events"]), where
    else:
        # this small model can finish (~0.1 s) before the browser asks for the analysis's page,
        # which is then the result page at once, with no stream to follow: its steps, in order
        stages = "|".join(STAGES)
        listed = re.findall(rf"^({stages}) \d+\.\d\d s ", seen["report"], re.MULTILINE)
        assert listed == [*STAGES[:-2], "done"], where
    assert "Classification report" in seen["report"] and "Colour photograph demo classifier" in seen["report"]
    assert "rule 'photo-fundus' -> photo-demo" in seen["report"], where
    assert re.search(r"red Red \(99PACSNODE C-1\)\s+0\.\d{3}\s+0\.50\s+positive", seen["report"]), where
    assert any(i.startswith("heatmap for red") and not i.endswith(" 0x0") for i in seen["images"]), where
    assert seen["printButton"] == 1 and seen["printHeaderShown"] is False, where
    assert shot.stat().st_size > 10_000 and report.stat().st_size > 10_000


def _running_job(node: Node, study_uid: str, key: str) -> int:
    """A study with one queued job that the runner leaves alone (due in an hour)."""
    now = utcnow()
    with Session(node.engine) as db:
        db.add(Study(study_uid=study_uid, first_received_at=now, last_received_at=now, state="complete"))
        db.commit()
        job = add_job(
            db,
            key=key,
            state=JobState.QUEUED,
            study_uid=study_uid,
            model_id="cxr",
            not_before=now + timedelta(hours=1),
        )
        return job.id


def _set_state(node: Node, job_id: int, state: str) -> None:
    with Session(node.engine) as db:
        row = db.get(Job, job_id)
        row.state, row.updated_at = state, utcnow()
        db.add(row)
        db.commit()


@pytest.mark.slow
def test_browser_study_page_follows_its_running_job(page, served):
    node_js = playwright_node()
    study_uid = "1.2.826.0.1.3680043.8.498.77.2"
    job_id = _running_job(page.node, study_uid, "analyse-page-browser")
    browser = subprocess.Popen(
        [node_js, str(Path(__file__).parent / "study_progress.mjs"), served, READ_TOKEN, study_uid],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        opened = browser.stdout.readline()  # the browser started, signed in and shows the page
        assert opened.strip() == "OPEN", opened + browser.stderr.read()[-3000:]
        time.sleep(1.5)
        _set_state(page.node, job_id, JobState.INFERRING)
        time.sleep(2.5)
        _set_state(page.node, job_id, JobState.DONE)
        out, err = browser.communicate(timeout=120)
    finally:
        browser.kill()
    assert browser.returncode == 0, out[-3000:] + err[-3000:]
    seen = json.loads(out.strip().splitlines()[-1])
    where = json.dumps(seen, indent=1)
    assert not seen["errors"] and seen["shownAtFirst"], where
    assert seen["lines"][0] == f"job {job_id} cxr queued", where
    assert f"job {job_id} cxr done" in seen["lines"], where
    assert seen["loads"] >= 1 and seen["shownAfterReload"] is False, where
