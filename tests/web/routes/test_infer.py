"""POST /api/v1/infer: the pipeline's routing, preprocessing and model on one uploaded file, and
every refusal with its status and message."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.encaps import encapsulate

from tests.helpers import sample_file


def _post(processed, data: bytes, name: str = "image.dcm"):
    return processed.client.post("/api/v1/infer", files={"file": (name, data, "application/dicom")})


def _cxr_file(processed) -> Path:
    return sorted((processed.folder / "sick").glob("*.dcm"))[0]


def _edited(path: Path, edit) -> bytes:
    ds = pydicom.dcmread(path)
    edit(ds)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_infer_cxr_with_heatmap(processed):
    answer = _post(processed, _cxr_file(processed).read_bytes())
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["rule"]
    (result,) = body["results"]
    assert result["model_id"] == "cxr" and result["model_version"] == "1.0.0"
    findings = {f["label"]: f for f in result["findings"]}
    assert findings["pneumonia"]["positive"] and findings["pneumonia"]["probability"] > 0.5
    assert result["heatmaps"] and result["heatmaps"][0]["label"] == "pneumonia"
    png = processed.client.get(result["heatmaps"][0]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    assert processed.client.get("/api/v1/heatmaps/unknown.png").status_code == 404


def test_not_dicom(processed):
    answer = _post(processed, b"this is a text file, not an image\n" * 10, "notes.txt")
    assert answer.status_code == 400
    assert "not a DICOM file" in answer.json()["detail"]


def test_no_file_field(processed):
    answer = processed.client.post("/api/v1/infer", data={"other": "x"})
    assert answer.status_code == 400 and "'file'" in answer.json()["detail"]


def test_no_pixel_data(processed):
    answer = _post(processed, _edited(sample_file("CT_small.dcm"), lambda ds: ds.__delattr__("PixelData")))
    assert answer.status_code == 422
    assert "no pixel data" in answer.json()["detail"]


def test_unsupported_transfer_syntax(processed):
    def mpeg2(ds):
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder here
        ds.PixelData = encapsulate([ds.PixelData])
        ds["PixelData"].VR = "OB"

    answer = _post(processed, _edited(sample_file("CT_small.dcm"), mpeg2))
    assert answer.status_code == 415
    assert "unsupported transfer syntax 1.2.840.10008.1.2.4.100" in answer.json()["detail"]


def test_modality_with_no_route(processed):
    def ultrasound(ds):
        ds.Modality = "US"

    answer = _post(processed, _edited(sample_file("CT_small.dcm"), ultrasound))
    assert answer.status_code == 422
    assert answer.json()["detail"].startswith("no route for this image (modality US)")
    # a rule matches, but its model is not loaded in this node
    ct = _post(
        processed, _edited(sample_file("CT_small.dcm"), lambda ds: setattr(ds, "BodyPartExamined", "ABDOMEN"))
    )
    assert ct.status_code == 422 and "not loaded" in ct.json()["detail"]


def test_too_large(processed):
    answer = _post(processed, b"\0" * (5 * 2**20))  # the limit is 4 MB in this node
    assert answer.status_code == 413
    assert "limit" in answer.json()["detail"]


def test_timeout(processed):
    web = processed.node.settings.web
    saved = web.infer_timeout_s
    web.infer_timeout_s = 1e-6
    try:
        answer = _post(processed, _cxr_file(processed).read_bytes())
    finally:
        web.infer_timeout_s = saved
    assert answer.status_code == 504
    assert "too long" in answer.json()["detail"] or "did not finish" in answer.json()["detail"]
