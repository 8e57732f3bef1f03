"""A classifier without a heatmap (``heatmap: none``, as every converted MONAI bundle classifier
has): it gets its scores and its SR, no display of its images is made (not in the preparation
processes, not decoded again afterwards), no secondary capture is attempted, and the upload page
analyses a file for it without an overlay instead of failing."""

from __future__ import annotations

import importlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml

from node import runner
from node.app import build_node, output_identity
from node.inference.isolate import PreparePool
from node.inference.prepared import PrepareSpec
from node.inference.registry import LoadedModel, load_registry
from node.inference.runtime import RuntimeConfig, create_session
from node.settings import Settings, load_settings
from node.synth import generate_study
from node.types import OutputKind
from tests.helpers import REPO, write_config

analysis = importlib.import_module("node.runner.analyse")  # node.runner.analyse is also a function


def _model_folder(folder: Path, level: str) -> Path:
    """The bundled cxr model with ``heatmap: none`` (its CAM output left unused) at ``level``."""
    target = folder / "cxr"
    shutil.copytree(REPO / "models" / "onnx" / "cxr", target)
    manifest = yaml.safe_load((target / "manifest.yaml").read_text())
    manifest["heatmap"] = {"method": "none"}
    manifest["outputs"].pop("cam", None)
    manifest["aggregation"]["level"] = level
    (target / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("no-heatmap-study")
    generate_study("cxr", folder, seed=5, label="pneumonia", scale=0.5)
    return sorted(folder.glob("*.dcm"))


@pytest.fixture(scope="module")
def pool() -> Iterator[PreparePool]:
    out = PreparePool(1, 2048, 20)
    yield out
    out.close()


def _loaded(folder: Path) -> LoadedModel:
    return load_registry(folder).get("cxr")


def _analyse(model: LoadedModel, files: list[Path], level: str, preparer: PreparePool | None = None):
    session = create_session(model, RuntimeConfig(warmup=False))
    watch = analysis.Stopwatch(deadline=time.monotonic() + 120)
    return analysis.analyse(
        model, session, files, level=level, uid_seed="no-heatmap", watch=watch, preparer=preparer
    )


def test_which_models_show_their_images(tmp_path: Path) -> None:
    bundled = load_registry(REPO / "models" / "onnx")
    assert analysis.shows_images(bundled.get("cxr").manifest)  # CAM
    assert analysis.shows_images(bundled.get("mammo").manifest)  # patch heatmap
    assert analysis.shows_images(bundled.get("ct-liver-seg").manifest)  # heatmap none, masks shown
    assert not analysis.shows_images(_loaded(_model_folder(tmp_path, "image")).manifest)


@pytest.mark.parametrize("level", ["image", "series"])
def test_scores_and_sr_without_any_display(tmp_path: Path, files, pool, monkeypatch, level: str) -> None:
    plain = _loaded(_model_folder(tmp_path, level))
    streamed: list[tuple[type, bool]] = []  # (spec type, a display came back) per frame
    real_stream = pool.stream

    def stream(items, spec, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - a spy
        for frame in real_stream(items, spec, *args, **kwargs):
            streamed.append((type(spec), frame.display is not None))
            yield frame

    monkeypatch.setattr(pool, "stream", stream)
    with_cam = _loaded(REPO / "models" / "onnx")
    reference, _ = _analyse(with_cam, files, level, pool)
    assert all(im.display is not None and im.heatmaps for im in reference.images)
    for preparer in (None, pool):
        streamed.clear()
        result, sources = _analyse(plain, files, level, preparer)
        assert result.images and all(im.display is None for im in result.images)
        assert all(im.heatmaps == () for im in result.images)
        # the same model on the same tensors: the same scores as with its CAM heatmap
        assert result.findings == reference.findings
        assert [im.scores for im in result.images] == [im.scores for im in reference.images]
        settings = Settings()
        outputs = runner.build_outputs(result, sources, output_identity(settings), settings)
        kinds = [kind for kind, _ in outputs]
        assert OutputKind.SR in kinds and OutputKind.SC not in kinds
        sr = next(ds for kind, ds in outputs if kind == OutputKind.SR)
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert {r.ReferencedSOPInstanceUID for r in evidence.ReferencedSOPSequence} == {
            str(ds.SOPInstanceUID) for ds in sources
        }
    # the preparation processes made no display, and nothing was decoded again to show it
    assert streamed == [(PrepareSpec, False)] * len(files)


def test_a_data_set_handed_in_gets_no_display_either(tmp_path: Path, files) -> None:
    manifest = _loaded(_model_folder(tmp_path, "image")).manifest
    ds = pydicom.dcmread(files[0])
    (frame,) = PrepareSpec(manifest, keep_display=False, shows=False).prepare(ds, 0)
    assert frame.display is None and frame.model_input is not None
    # a model that shows its images keeps a data set's display (it cannot be decoded again)
    (shown,) = PrepareSpec(manifest, keep_display=False).prepare(pydicom.dcmread(files[0]), 0)
    assert shown.display is not None and shown.display.shape == (shown.header.rows, shown.header.cols)


def test_the_upload_page_analyses_a_file_for_it_without_an_overlay(tmp_path: Path, files) -> None:
    config = write_config(tmp_path, models={"directory": str(_model_folder(tmp_path / "models", "image"))})
    node = build_node(load_settings(config))
    node.start()
    try:
        rule, outcomes = node.analyse_upload(files[0].read_bytes(), time.monotonic() + 120)
    finally:
        node.stop()
    assert rule.startswith("cxr")
    ((result, overlays),) = outcomes
    assert overlays == []
    assert result.algorithm.model_id == "cxr" and {s.label for s in result.findings} >= {"pneumonia"}
