"""``pacs-node models check``: each model through the registry's checks and a phantom of its modality."""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from node.inference import preprocess as pp
from node.inference.decode import decode
from node.inference.manifest import PatchHeatmap
from node.inference.registry import LoadedModel, load_model
from node.inference.runtime import CPU, RuntimeConfig, create_session
from node.runner.analyse import Stopwatch, analyse

#: DICOM modality -> phantom kind, and small render options that keep the check quick.
#: The colour kinds follow the phantoms' own modalities: fundus OP, dermoscopy XC, smear GM/SM.
PHANTOM_FOR_MODALITY = {
    "CR": "cxr",
    "DX": "cxr",
    "MG": "mammo",
    "CT": "ct",
    "MR": "mr",
    "OP": "fundus",
    "XC": "derm",
    "GM": "smear",
    "SM": "smear",
}
FAST_OPTIONS: dict[str, dict[str, Any]] = {
    "cxr": {"scale": 0.25},
    "mammo": {"scale": 0.125},
    "ct": {"slices": 8, "size": 128},
    "mr": {"slices": 8, "size": 128},
    "fundus": {"size": 256},
    "derm": {"size": 256},
    "smear": {"size": 256},
}


@dataclass
class CheckReport:
    """What one model's check found."""

    model_id: str
    ok: bool
    lines: list[str] = field(default_factory=list)


def phantom_kind(model: LoadedModel) -> str | None:
    """The phantom kind for the model's first routed modality (None when no phantom fits)."""
    for modality in model.manifest.routing.modalities:
        if modality in PHANTOM_FOR_MODALITY:
            return PHANTOM_FOR_MODALITY[modality]
    return None


def check_model(
    model_dir: Path, providers: tuple[str, ...] = (CPU,), threads: int = 2, repeats: int = 5
) -> CheckReport:
    """Load ``model_dir`` via the registry, run a phantom through preprocessing, the session and
    ``analyse``; report shapes, value ranges, provider and latency. Never raises."""
    from node.synth import generate_study

    report = CheckReport(model_dir.name, ok=False)
    out = report.lines
    try:
        model = load_model(model_dir)
    except Exception as exc:
        out.append(f"FAIL registry: {exc}")
        return report
    manifest = model.manifest
    out.append(f"manifest and graph agree; sha256 {manifest.model.sha256[:12]}... ok")
    if "TODO" in (model_dir / "manifest.yaml").read_text(encoding="utf-8"):
        out.append("warning: manifest.yaml still contains TODO markers")
    kind = phantom_kind(model)
    if kind is None:
        out.append(f"FAIL no phantom for modalities {manifest.routing.modalities} (routing.modalities)")
        return report
    try:
        config = RuntimeConfig(providers=providers, intra_op_threads=threads, inter_op_threads=1)
        session = create_session(model, config)
        out.append(f"provider {session.active_provider} (session providers {', '.join(session.providers)})")
        with tempfile.TemporaryDirectory(prefix="models-check-") as tmp:
            truth = generate_study(kind, Path(tmp), seed=1, write_masks=False, **FAST_OPTIONS[kind])
            files = [Path(tmp) / inst.file for inst in truth.instances]
            decoded = decode(files[0], frames="first")
            is_patch = isinstance(manifest.heatmap, PatchHeatmap)
            model_input = pp.prepare(decoded, manifest, check_size=not is_patch)
            tensor = model_input.tensor
            out.append(
                f"phantom {kind}: {len(files)} file(s); input {manifest.input.name} {tuple(tensor.shape)} "
                f"{tensor.dtype} range [{float(tensor.min()):.3g}, {float(tensor.max()):.3g}]"
            )
            if is_patch:
                h, w = manifest.input.spatial
                if manifest.input.layout == "NCHW":
                    tensor = tensor[:, :, : h or 1, : w or 1]
                else:
                    tensor = tensor[:, : h or 1, : w or 1, :]
                out.append(f"patch model: latency and outputs below are for one {h}x{w} tile")
            if manifest.input.is_volume:
                tensor = _one_window(tensor, model_input.layout, manifest.roi_size)
                out.append(f"3-D model: latency and outputs below are for one window {tuple(tensor.shape)}")
            times = []
            outputs: dict[str, np.ndarray] = {}
            for _ in range(repeats):
                t0 = time.perf_counter()
                outputs = session.run(tensor)
                times.append(time.perf_counter() - t0)
            for name, value in outputs.items():
                finite = bool(np.isfinite(value).all())
                out.append(
                    f"output {name}: shape {tuple(value.shape)} {value.dtype} range "
                    f"[{float(np.nanmin(value)):.4g}, {float(np.nanmax(value)):.4g}]"
                    + ("" if finite else " NOT FINITE")
                )
                if not finite:
                    out.append(f"FAIL output {name} has NaN or infinite values")
                    return report
            out.append(
                f"latency (batch 1, {repeats} runs): median {statistics.median(times) * 1000:.1f} ms, "
                f"min {min(times) * 1000:.1f} ms"
            )
            t0 = time.perf_counter()
            result, _ = analyse(
                model,
                session,
                files,
                level=manifest.aggregation.level,
                uid_seed="models-check",
                watch=Stopwatch(deadline=time.monotonic() + 300),
            )
            seconds = time.perf_counter() - t0
            scores = ", ".join(f"{f.label}={f.probability:.3f}" for f in result.findings)
            maps = sum(len(im.heatmaps) for im in result.images)
            out.append(
                f"analyse (decode -> preprocess -> infer -> aggregate): {seconds * 1000:.0f} ms; "
                f"{scores}; {maps} heatmap(s)"
            )
    except Exception as exc:
        out.append(f"FAIL {type(exc).__name__}: {exc}")
        return report
    report.ok = True
    return report


def _one_window(prepared: np.ndarray, layout: str, roi: tuple[int, int, int] | None) -> np.ndarray:
    """One sliding window (1, C, d, h, w) of a 3-D model filled with a prepared slice repeated
    along depth (cropped or zero-padded in-plane)."""
    assert roi is not None
    plane = prepared[0] if layout == "NCHW" else prepared[0].transpose(2, 0, 1)  # (C, H, W)
    d, h, w = roi
    window = np.zeros((1, plane.shape[0], d, h, w), dtype=prepared.dtype)
    hh, ww = min(h, plane.shape[1]), min(w, plane.shape[2])
    window[0, :, :, :hh, :ww] = plane[:, np.newaxis, :hh, :ww]
    return window
