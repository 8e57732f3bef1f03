"""End to end for the colour photographic modalities (issue 20): a fundus photograph (OP, JPEG
baseline YBR_FULL_422), a dermoscopy image (XC, native YBR_FULL_422) and a blood smear (GM, RGB
planar 1) are sent with DCMTK's dcmsend to a node routing them with the shipped rules to three
tiny colour models built here with torch (manifests using the colour ops); each comes back to a
DCMTK storescp as an SR with its finding site and a colour heatmap SC, both free of node-caused
dciodvfy errors. The same with the real pieces: node.synth phantoms of the three kinds (the fundus
one JPEG baseline YBR_FULL_422) through the bundled models (models/onnx), whose SRs carry the
models' SNOMED CT codes. A node without the models records the photographs as not routed, naming
them."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from node.app import build_node
from node.settings import load_settings
from node.store.tables import JobState
from node.synth import generate_study
from tests.colour import colour_dataset, picture, write
from tests.e2e.test_orthanc import wait_jobs
from tests.helpers import (
    StoreSCP,
    analysing_config,
    free_port,
    need,
    need_module,
    node_db_url,
    query_db,
    wait_for,
    write_config,
)
from tests.outputs.test_real_sources import our_errors

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CSPS = "1.2.840.10008.5.1.4.1.1.11.2"
SIZE = 32
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.25, 0.25]

#: model id -> (photograph kind, encoding, planar, colour steps, label name, label code)
MODELS = {
    "fundus-dr": (
        "fundus",
        "JPEG",
        0,
        [
            {"op": "circular_crop", "threshold": 0.04},
            {"op": "clahe_luminance", "clip_limit": 2.0, "tile_grid": 4},
        ],
        "referable_dr",
        {"value": "4855003", "scheme_designator": "SCT", "meaning": "Diabetic retinopathy"},
    ),
    "derm-lesion": (
        "derm",
        "YBR_FULL_422",
        0,
        [{"op": "clahe_luminance"}],
        "melanoma",
        {"value": "372244006", "scheme_designator": "SCT", "meaning": "Malignant melanoma"},
    ),
    "smear-malaria": (
        "smear",
        "RGB",
        1,
        [{"op": "illumination_correction", "sigma_fraction": 0.1}],
        "plasmodium",
        {"value": "61462000", "scheme_designator": "SCT", "meaning": "Malaria"},
    ),
}


def export_model(path: Path) -> bytes:
    """A tiny CAM classifier (torch -> ONNX): 1x1 conv of the 4x4-pooled RGB input to 2 maps,
    global average = logits. Label 0 (biased to positive) weighs red up and blue down, so its
    map is high where a photograph is red; label 1 is its opposite (negative)."""
    torch = need_module("torch")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = torch.nn.AvgPool2d(4)
            self.head = torch.nn.Conv2d(3, 2, 1, bias=True)
            with torch.no_grad():
                self.head.weight.copy_(
                    torch.tensor([[3.0, -1.0, -2.0], [-3.0, 1.0, 2.0]]).reshape(2, 3, 1, 1)
                )
                self.head.bias.copy_(torch.tensor([4.0, -4.0]))

        def forward(self, x):  # noqa: ANN001, ANN201
            cam = self.head(self.pool(x))
            return cam.mean(dim=(2, 3)), cam

    torch.onnx.export(
        Tiny().eval(),
        torch.zeros(1, 3, SIZE, SIZE),
        str(path),
        input_names=["image"],
        output_names=["logits", "cam"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}, "cam": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )
    return path.read_bytes()


def write_models(folder: Path) -> Path:
    """models/onnx-like folder with the three models; their manifests use the colour ops."""
    for model_id, (kind, _, _, steps, label, code) in MODELS.items():
        model_dir = folder / model_id
        model_dir.mkdir(parents=True)
        blob = export_model(model_dir / "model.onnx")
        manifest = {
            "manifest_version": 1,
            "id": model_id,
            "name": f"Tiny {kind} test model",
            "version": "0.0.1",
            "description": f"A two-weight colour classifier for the {kind} end-to-end test.",
            "research_use_only": True,
            "intended_use": "Tests only; not for diagnostic use.",
            "provenance": {
                "training_script": "tests/e2e/test_colour_photographs.py",
                "data": "none",
                "seed": 0,
                "created": "2026-12-01",
            },
            "model": {"file": "model.onnx", "sha256": hashlib.sha256(blob).hexdigest()},
            "input": {"name": "image", "shape": [None, 3, SIZE, SIZE], "dtype": "float32", "layout": "NCHW"},
            "preprocessing": [
                *steps,
                {"op": "resize", "size": [SIZE, SIZE], "interpolation": "area"},
                {"op": "normalize", "mean": MEAN, "std": STD, "max_pixel_value": 255},
            ],
            "outputs": {"probabilities": "logits", "activation": "sigmoid", "cam": "cam"},
            "kind": "multi_label",
            "labels": [
                {"name": label, "index": 0, "code": code, "threshold": 0.5, "triage": True},
                {
                    "name": "other",
                    "index": 1,
                    "code": {"value": "99PN9001", "scheme_designator": "99PACSNODE", "meaning": "Other"},
                    "threshold": 0.5,
                },
            ],
            "heatmap": {"method": "cam", "normalize": "relu_max"},
            "aggregation": {"level": "image"},
        }
        (model_dir / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return folder


def photographs(folder: Path) -> dict[str, tuple[Path, pydicom.Dataset]]:
    """One photograph per model, in its own study, written as files."""
    out = {}
    for model_id, (kind, encoding, planar, *_rest) in MODELS.items():
        ds = colour_dataset(kind, picture(kind, seed=4), encoding=encoding, planar=planar)
        out[model_id] = (write(ds, folder / f"{kind}.dcm"), ds)
    return out


def dcmsend(port: int, paths: list[Path]) -> None:
    proc = subprocess.run(
        [need("dcmsend"), "-aec", "PACSNODE", "127.0.0.1", str(port), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def run_through_node(
    config: Path, dest: StoreSCP, sent: dict[str, tuple[Path, pydicom.Dataset]]
) -> tuple[list, dict[str, list[pydicom.Dataset]]]:
    """Start a node on ``config``, dcmsend the ``sent`` photographs (model id -> file, dataset; one
    study each) and wait for each study's job and for an SR and a heatmap SC back at ``dest``.
    Returns the jobs and the received objects by study UID (each with its ``filename``)."""
    node = build_node(load_settings(config))
    node.start()
    try:
        dcmsend(node.scp.port, [path for path, _ in sent.values()])
        studies = {str(ds.StudyInstanceUID): model_id for model_id, (_, ds) in sent.items()}
        jobs = wait_jobs(node, set(studies), timeout=300)
        assert {j.model_id: j.state for j in jobs} == {m: JobState.DONE for m in sent}, [
            j.error for j in jobs
        ]
        for job in jobs:
            assert job.level == "image" and job.rule and job.model_id == studies[job.study_uid]

        def outputs() -> dict[str, list[pydicom.Dataset]] | None:
            got: dict[str, list[pydicom.Dataset]] = {}
            for path in sorted(dest.folder.iterdir()):
                ds = pydicom.dcmread(path)
                ds.filename = str(path)
                got.setdefault(str(ds.StudyInstanceUID), []).append(ds)
            return got if all(_has_sr_and_sc(got.get(uid, [])) for uid in studies) else None

        received = wait_for(outputs, 120, "an SR and a heatmap SC back for each photograph")
    finally:
        node.stop()
        dest.stop()
    return jobs, received


def check_outputs(
    objects: list[pydicom.Dataset], source: pydicom.Dataset, kind: str, label: str, code: dict, *, csps: bool
) -> pydicom.Dataset:
    """One photograph's outputs: an SR whose findings include ``code`` at the photograph's site,
    an RGB heatmap SC for ``label`` referencing the photograph and keeping its colours (and a CSPS
    when ``csps``), every object free of node-caused dciodvfy errors. Returns the SR."""
    (sr,) = [d for d in objects if d.Modality == "SR"]
    scs = [d for d in objects if "heatmap" in str(d.get("SeriesDescription", "")).lower()]
    assert scs, [(d.Modality, d.get("SeriesDescription")) for d in objects]
    for out in (sr, *scs):
        assert our_errors(Path(out.filename), source) == [], (kind, out.Modality)
    others = [d for d in objects if d is not sr and d not in scs]  # parametric map, CSPS, KOS
    if csps:
        assert {str(d.SOPClassUID) for d in others} >= {CSPS}, [d.SOPClassUID.name for d in others]
    for out in others:
        assert our_errors(Path(out.filename), source) == [], (kind, out.SOPClassUID.name)

    # the SR: the finding, at its site
    items = list(_walk(sr))
    findings = [
        i
        for i in items
        if i.get("ValueType") == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "121071"
    ]
    found = {
        (f.ConceptCodeSequence[0].CodingSchemeDesignator, f.ConceptCodeSequence[0].CodeValue)
        for f in findings
    }
    assert (code["scheme_designator"], code["value"]) in found, found
    sites = [i for i in items if i.ConceptNameCodeSequence[0].CodeValue == "363698007"]
    # the photograph's coded anatomy (a phantom fundus: the retina), else the kind's default
    region = source.get("AnatomicRegionSequence")
    default_site = {"fundus": "81745001", "derm": "39937001", "smear": "87612001"}[kind]
    expected_site = str(region[0].CodeValue) if region else default_site
    assert sites and {s.ConceptCodeSequence[0].CodeValue for s in sites} == {expected_site}

    # the SC: RGB, referencing the photograph, the photograph's colours kept around the map
    sc = next(s for s in scs if f"AI heatmap for {label} " in s.ImageComments)
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    pixels = sc.pixel_array.astype(int)
    image = pixels[: round(source.Rows * 512 / source.Columns), :512]
    spread = np.abs(image[..., 0] - image[..., 2])
    assert spread.mean() > 15, "the SC shows a colour image"
    return sr


def test_photographs_come_back_as_sr_and_colour_heatmap(tmp_path: Path) -> None:
    models = write_models(tmp_path / "models")
    dest_port = free_port()
    dest = StoreSCP(tmp_path / "dest", dest_port)
    config = write_config(
        tmp_path,
        models={"directory": str(models), "providers": ["CPUExecutionProvider"]},
        assembly={"series_quiet_s": 0.5, "poll_interval_s": 0.1},
        destinations=[{"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}],
        outputs={"send_to": "all"},
        web={"enabled": False},
    )
    # the shipped rules; only the colour models are here
    sent = photographs(tmp_path / "in")
    _, received = run_through_node(config, dest, sent)
    for model_id, (_, source) in sent.items():
        kind, _, _, _, label, code = MODELS[model_id]
        check_outputs(received[str(source.StudyInstanceUID)], source, kind, label, code, csps=True)


#: bundled model id -> (phantom kind, the phantom's positive label, node.synth options)
BUNDLED = {
    "fundus-dr": ("fundus", "referable_dr", {"size": 256, "jpeg": True}),  # JPEG baseline YBR_FULL_422
    "derm-lesion": ("derm", "melanoma", {"size": 256}),
    "smear-malaria": ("smear", "plasmodium", {"size": 256}),
}


def test_synth_phantoms_through_the_bundled_colour_models(tmp_path: Path) -> None:
    """The real pieces: a node.synth phantom of each colour kind (the fundus one JPEG baseline
    YBR_FULL_422), dcmsend to a node with the bundled models (models/onnx) and the shipped
    config/routes.yaml; each comes back to storescp as an SR whose finding is the bundled model's
    SNOMED CT code for the phantom's lesion, and an RGB heatmap SC, free of node-caused dciodvfy
    errors."""
    dest_port = free_port()
    dest = StoreSCP(tmp_path / "dest", dest_port)
    config = analysing_config(tmp_path, dest_port, assembly={"series_quiet_s": 0.5, "poll_interval_s": 0.1})
    sent: dict[str, tuple[Path, pydicom.Dataset]] = {}
    for n, (model_id, (kind, label, options)) in enumerate(BUNDLED.items()):
        folder = tmp_path / "phantoms" / kind
        truth = generate_study(kind, folder, seed=31 + n, label=label, write_masks=False, **options)
        (instance,) = truth.instances
        path = folder / instance.file
        sent[model_id] = (path, pydicom.dcmread(path))
    fundus = sent["fundus-dr"][1]
    assert fundus.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert fundus.PhotometricInterpretation == "YBR_FULL_422"

    jobs, received = run_through_node(config, dest, sent)
    for model_id, (_, source) in sent.items():
        kind, label, _ = BUNDLED[model_id]
        manifest = yaml.safe_load((ROOT / "models" / "onnx" / model_id / "manifest.yaml").read_text())
        (entry,) = [lab for lab in manifest["labels"] if lab["name"] == label]
        code = entry["code"]
        assert code["scheme_designator"] == "SCT"
        sr = check_outputs(received[str(source.StudyInstanceUID)], source, kind, label, code, csps=False)
        # every finding the SR codes is one of the bundled model's SNOMED CT label codes
        codes = {str(lab["code"]["value"]) for lab in manifest["labels"]}
        coded = {
            i.ConceptCodeSequence[0].CodeValue
            for i in _walk(sr)
            if i.get("ValueType") == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "121071"
        }
        assert coded and coded <= codes, (model_id, coded, codes)
        (job,) = [j for j in jobs if j.model_id == model_id]
        result = job.recorded_result()
        assert result is not None
        (finding,) = [f for f in result.findings if f.label == label]
        assert finding.positive, (model_id, finding)  # the phantom's lesion, found by the real model


def _has_sr_and_sc(objects: list[pydicom.Dataset]) -> bool:
    modalities = [str(d.Modality) for d in objects]
    heatmaps = [d for d in objects if "heatmap" in str(d.get("SeriesDescription", "")).lower()]
    return "SR" in modalities and bool(heatmaps)


def _walk(item: pydicom.Dataset):
    for child in item.get("ContentSequence") or []:
        yield child
        yield from _walk(child)


def test_without_the_models_the_photographs_are_not_routed_and_say_why(tmp_path: Path) -> None:
    """The shipped rules name models a site may not have installed: the node still starts
    (models.strict false) and records each photograph as not routed, naming the model."""
    config = write_config(
        tmp_path, assembly={"series_quiet_s": 0.5, "poll_interval_s": 0.1}, web={"enabled": False}
    )
    node = build_node(load_settings(config))
    node.start()
    try:
        sent = photographs(tmp_path / "in")
        dcmsend(node.scp.port, [path for path, _ in sent.values()])
        db = node_db_url(config)

        def notes() -> dict[str, str] | None:
            rows = query_db(db, "SELECT series_uid, state, route_note FROM series")
            decided = {uid: note for uid, state, note in rows if state == "not routed" and note}
            return decided if len(decided) == len(sent) else None

        decided = wait_for(notes, 60, "every photograph recorded as not routed")
    finally:
        node.stop()
    rules = {"fundus-dr": "fundus", "derm-lesion": "dermoscopy", "smear-malaria": "blood-smear"}
    for model_id, (_, ds) in sent.items():
        assert decided[str(ds.SeriesInstanceUID)].startswith(
            f"not routed: rule '{rules[model_id]}' names model {model_id}, which is not loaded"
        )
