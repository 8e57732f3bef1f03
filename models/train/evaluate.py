"""Evaluate the reference models on held-out phantoms through the node's own serving path.

    .venv/bin/python models/train/evaluate.py --model all --n 120            # print the metrics
    .venv/bin/python models/train/evaluate.py --model all --n 120 --write    # and write them into
                                                    # models/onnx/<id>/manifest.yaml and MODEL_CARD.md

Each held-out study is rendered by ``node.synth.generate_study`` as DICOM files (a base seed
disjoint from the training seeds, labels balanced over the label choices), then analysed exactly as
the node serves a job: ``node.inference.registry`` (sha256 and graph I/O checked) ->
``node.inference.runtime`` session -> ``node.runner.analyse.analyse`` (decode, preprocessing from
the manifest, inference, CAM / patch heatmaps, aggregation over slices or views).

Reported per model: per finding ROC AUC of the series/study score, accuracy, sensitivity and
specificity at the manifest threshold, and the heatmap hit rate: the fraction of positive images
whose heatmap peak for the true finding lies inside one of that finding's lesion boxes, strictly and
with the box dilated by half a heatmap cell on every side (CAM: 4 model pixels, i.e. 1/32 of the
input side; patch map: half the patch stride), converted to source pixels. For CT and MR only the
top slice the node shows first (highest suspicion) is checked, and it must contain the lesion.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.train.common import (  # noqa: E402
    ONNX_ROOT,
    PHOTO_KINDS,
    RESEARCH,
    SPECS,
    SYNTHETIC,
    TRAIN_SEED,
    Spec,
    study_seeds,
    write_manifest,
)
from node.evaluate.classification import auc, confusion  # noqa: E402
from node.inference.manifest import CamHeatmap, Manifest, PatchHeatmap  # noqa: E402
from node.inference.registry import LoadedModel, load_model  # noqa: E402
from node.inference.runtime import CPU, ModelSession, RuntimeConfig, create_session  # noqa: E402
from node.runner.analyse import Stopwatch, analyse  # noqa: E402
from node.synth import generate_study, label_choices  # noqa: E402
from node.synth.truth import StudyTruth  # noqa: E402
from node.types import AnalysisResult, ImageResult  # noqa: E402

#: Base seed of the held-out set (the training set uses ``TRAIN_SEED``; overlapping seeds are skipped).
EVAL_SEED = 5_550_123
#: Base seed of the calibration set used to choose operating thresholds (``--calibrate``).
CALIB_SEED = 7_770_321
#: How many training seeds are excluded from held-out sets (more than any training run renders).
TRAIN_SEEDS_EXCLUDED = 20_000
#: CamNet features are 1/8 of the input: one CAM cell covers 8 model pixels.
CAM_CELL = 8


# ------------------------------------------------------------------------------------------------
# Data


def heldout_seeds(n: int, base: int = EVAL_SEED) -> list[int]:
    """``n`` study seeds drawn from ``base``, none of which the training set (``TRAIN_SEED``) used."""
    train = set(study_seeds(TRAIN_SEED, TRAIN_SEEDS_EXCLUDED))
    out: list[int] = []
    for s in study_seeds(base, 2 * n + 16):
        if s not in train:
            out.append(s)
        if len(out) == n:
            return out
    raise RuntimeError("could not draw enough held-out seeds")  # pragma: no cover


def balanced_labels(spec: Spec, n: int) -> list[tuple[str, ...]]:
    """``n`` study label sets cycling through every label choice of the phantom kind."""
    choices = label_choices(spec.kind)
    return [choices[i % len(choices)] for i in range(n)]


def model_grid(manifest: Manifest) -> tuple[int, int]:
    """The (height, width) of the image the model (or its patch tiler) sees: the last resize size."""
    size: tuple[int, int] | None = None
    for step in manifest.preprocessing:
        if step.op in ("resize", "letterbox"):
            size = (int(step.size[0]), int(step.size[1]))
    if size is None:
        h, w = manifest.input.spatial
        size = (int(h or 1), int(w or 1))
    return size


def heatmap_margin(manifest: Manifest, rows: int, cols: int) -> float:
    """Half a heatmap cell in source pixels: the dilation applied to lesion boxes for the hit rate."""
    spec = manifest.heatmap
    if isinstance(spec, PatchHeatmap):
        cell = float(spec.stride[0])
    elif isinstance(spec, CamHeatmap):
        cell = float(CAM_CELL)
    else:
        cell = 0.0
    mh, mw = model_grid(manifest)
    return 0.5 * cell * max(rows / mh, cols / mw)


# ------------------------------------------------------------------------------------------------
# One case


@dataclass
class HeatmapCheck:
    """One positive image's heatmap for its true finding: is the peak inside a lesion box?"""

    label: str
    sop_instance_uid: str
    peak: tuple[int, int] | None
    strict: bool
    dilated: bool


@dataclass
class CaseResult:
    """One held-out study analysed by the node."""

    seed: int
    labels: tuple[str, ...]
    scores: dict[str, float]
    positive: dict[str, bool]
    checks: list[HeatmapCheck]
    n_images: int
    seconds: float


def _inside(row: int, col: int, boxes: Sequence[dict[str, Any]], margin: float) -> bool:
    """Whether pixel (row, col) lies in any box (x0, y0 inclusive; x1, y1 exclusive) grown by margin."""
    return any(
        b["y0"] - margin <= row < b["y1"] + margin and b["x0"] - margin <= col < b["x1"] + margin
        for b in boxes
    )


def _suspicion(manifest: Manifest, image: ImageResult) -> float:
    return max(s.probability for s, lb in zip(image.scores, manifest.labels, strict=True) if not lb.normal)


def heatmap_checks(manifest: Manifest, truth: StudyTruth, result: AnalysisResult) -> list[HeatmapCheck]:
    """Check the heatmap peak of every positive image (CT/MR: the top slice shown) for each true finding."""
    by_uid = {inst.sop_instance_uid: inst for inst in truth.instances}
    findings = [lb.name for lb in manifest.labels if not lb.normal and lb.name in truth.labels]
    if not findings or not result.images:
        return []
    images = list(result.images)
    if manifest.aggregation.level == "series":
        images = [max(images, key=lambda im: _suspicion(manifest, im))]
    checks = []
    for label in findings:
        for image in images:
            inst = by_uid[image.sop_instance_uid]
            boxes = [b for b in inst.boxes if b["label"] == label]
            if not boxes and manifest.aggregation.level != "series":
                continue  # this view does not show the lesion: not a positive image
            heatmap = next((h for h in image.heatmaps if h.label == label), None)
            hotspot = heatmap.hotspot if heatmap is not None else None
            if hotspot is None:
                checks.append(HeatmapCheck(label, image.sop_instance_uid, None, False, False))
                continue
            r, c = hotspot.peak_row, hotspot.peak_col
            margin = heatmap_margin(manifest, inst.rows, inst.columns)
            checks.append(
                HeatmapCheck(
                    label,
                    image.sop_instance_uid,
                    (r, c),
                    _inside(r, c, boxes, 0.0),
                    _inside(r, c, boxes, margin),
                )
            )
    return checks


def run_case(
    spec: Spec,
    model: LoadedModel,
    session: ModelSession,
    seed: int,
    label: tuple[str, ...],
    workdir: Path,
) -> CaseResult:
    """Write one phantom study as DICOM, analyse it with the node's ``analyse`` and score it."""
    t0 = time.monotonic()
    study_dir = workdir / f"{spec.id}-{seed}"
    truth = generate_study(spec.kind, study_dir, seed, label, write_masks=False, **spec.render_options)
    try:
        files = [study_dir / inst.file for inst in truth.instances]
        manifest = model.manifest
        result, _ = analyse(
            model,
            session,
            files,
            level=manifest.aggregation.level,
            uid_seed=f"eval-{spec.id}-{seed}",
            watch=Stopwatch(deadline=time.monotonic() + 600.0),
        )
        checks = heatmap_checks(manifest, truth, result)
    finally:
        shutil.rmtree(study_dir, ignore_errors=True)
    return CaseResult(
        seed=seed,
        labels=tuple(truth.labels),
        scores={f.label: f.probability for f in result.findings},
        positive={f.label: f.positive for f in result.findings},
        checks=checks,
        n_images=len(truth.instances),
        seconds=time.monotonic() - t0,
    )


# ------------------------------------------------------------------------------------------------
# A set of cases and its metrics


@dataclass
class Evaluation:
    """The cases of one model's held-out set and the metrics computed from them."""

    model_id: str
    manifest: Manifest
    base_seed: int
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def findings(self) -> list[str]:
        """The non-normal labels (the findings the model reports)."""
        return [lb.name for lb in self.manifest.labels if not lb.normal]

    def truth(self, label: str) -> np.ndarray:
        """Whether each case carries ``label``."""
        return np.array([label in c.labels for c in self.cases], dtype=bool)

    def scores(self, label: str) -> np.ndarray:
        """Each case's aggregated probability of ``label``."""
        return np.array([c.scores[label] for c in self.cases], dtype=np.float64)

    def label_metrics(self, label: str) -> dict[str, float]:
        """AUC, and accuracy / sensitivity / specificity at the manifest threshold, for one finding."""
        y = self.truth(label)
        pred = np.array([c.positive[label] for c in self.cases], dtype=bool)
        cm = confusion(y, pred)  # the node's metric code (pacs-node evaluate uses the same)
        return {
            "auc": auc(y, self.scores(label)),
            "accuracy": cm.accuracy if cm.n else 0.0,
            "sensitivity": cm.sensitivity,
            "specificity": cm.specificity,
            "positives": float(y.sum()),
            "negatives": float((~y).sum()),
        }

    def heatmap_rates(self, label: str | None = None) -> tuple[float, float, int]:
        """(strict hit rate, dilated hit rate, number of positive images checked)."""
        checks = [k for c in self.cases for k in c.checks if label is None or k.label == label]
        if not checks:
            return math.nan, math.nan, 0
        strict = sum(k.strict for k in checks) / len(checks)
        dilated = sum(k.dilated for k in checks) / len(checks)
        return strict, dilated, len(checks)

    def class_accuracy(self) -> float:
        """Multi-class models: how often the node's decision is the study's class. The decision is the
        most probable finding among those at or above their threshold, else the normal class."""
        normal = next((lb.name for lb in self.manifest.labels if lb.normal), "normal")
        hits = []
        for c in self.cases:
            called = [f for f in self.findings if c.positive[f]]
            decision = max(called, key=lambda f, c=c: c.scores[f]) if called else normal
            hits.append(decision == (c.labels[0] if c.labels else normal))
        return float(np.mean(hits)) if hits else math.nan

    def metrics(self) -> dict[str, float]:
        """Flat metrics for ``provenance.metrics`` (held-out set)."""
        out: dict[str, float] = {
            "heldout_studies": float(len(self.cases)),
            "heldout_seed": float(self.base_seed),
        }
        for label in self.findings:
            for key, value in self.label_metrics(label).items():
                if key in ("positives", "negatives"):
                    continue
                out[f"heldout_{key}_{label}"] = value
            strict, dilated, n = self.heatmap_rates(label)
            out[f"heldout_heatmap_hit_{label}"] = dilated
            out[f"heldout_heatmap_hit_strict_{label}"] = strict
        strict, dilated, n = self.heatmap_rates()
        out["heldout_heatmap_hit"] = dilated
        out["heldout_heatmap_hit_strict"] = strict
        out["heldout_heatmap_images"] = float(n)
        if self.manifest.kind == "multi_class":
            out["heldout_class_accuracy"] = self.class_accuracy()
        return {k: v for k, v in out.items() if not math.isnan(v)}

    def table_rows(self) -> list[list[str]]:
        """Rows: label, positives/negatives, AUC, acc, sens, spec, threshold, heatmap hit (dilated/strict)."""
        rows = []
        thresholds = {lb.name: lb.threshold for lb in self.manifest.labels}
        for label in self.findings:
            m = self.label_metrics(label)
            strict, dilated, n = self.heatmap_rates(label)
            rows.append(
                [
                    label,
                    f"{int(m['positives'])}/{int(m['negatives'])}",
                    f"{m['auc']:.3f}",
                    f"{m['accuracy']:.3f}",
                    f"{m['sensitivity']:.3f}",
                    f"{m['specificity']:.3f}",
                    f"{thresholds[label]:.3f}",
                    f"{dilated:.1%} / {strict:.1%} (n={n})",
                ]
            )
        return rows


TABLE_HEADER = [
    "finding",
    "pos/neg",
    "AUC",
    "accuracy",
    "sensitivity",
    "specificity",
    "threshold",
    "heatmap peak in box (dilated / strict)",
]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def open_model(model_id: str, root: Path = ONNX_ROOT, threads: int = 2) -> tuple[LoadedModel, ModelSession]:
    """Load one model through the registry's checks and create its warmed-up CPU session."""
    model = load_model(root / model_id)
    config = RuntimeConfig(providers=(CPU,), intra_op_threads=threads, inter_op_threads=1, max_batch=64)
    return model, create_session(model, config)


def evaluate_model(
    spec: Spec,
    model: LoadedModel,
    session: ModelSession,
    n: int,
    base_seed: int = EVAL_SEED,
    workdir: Path | None = None,
    progress: Callable[[int, CaseResult], None] | None = None,
) -> Evaluation:
    """Render ``n`` held-out studies (balanced labels) and run each through the node's ``analyse``."""
    ev = Evaluation(model.id, model.manifest, base_seed)
    seeds = heldout_seeds(n, base_seed)
    labels = balanced_labels(spec, n)
    with tempfile.TemporaryDirectory(prefix=f"eval-{spec.id}-", dir=workdir) as tmp:
        for i, (seed, label) in enumerate(zip(seeds, labels, strict=True)):
            case = run_case(spec, model, session, seed, label, Path(tmp))
            ev.cases.append(case)
            if progress is not None:
                progress(i, case)
    return ev


def youden_thresholds(ev: Evaluation) -> dict[str, float]:
    """Per finding, the threshold maximising sensitivity + specificity on ``ev`` (midpoint of the gap)."""
    out = {}
    for label in ev.findings:
        y, s = ev.truth(label), ev.scores(label)
        values = np.unique(s)
        cands = np.concatenate([[0.0], (values[:-1] + values[1:]) / 2, [1.0]]) if values.size > 1 else [0.5]
        best, best_j = 0.5, -1.0
        for t in cands:
            pred = s >= t
            sens = np.mean(pred[y]) if y.any() else 0.0
            spec_ = np.mean(~pred[~y]) if (~y).any() else 0.0
            j = sens + spec_ - 1
            if j > best_j + 1e-12:
                best, best_j = float(t), j
        out[label] = float(np.clip(best, 0.01, 0.99))
    return out


# ------------------------------------------------------------------------------------------------
# Model card


def _param_count(onnx_path: Path) -> int:
    import onnx

    model = onnx.load(str(onnx_path))
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer))


def model_card(
    spec: Spec,
    manifest: Manifest,
    ev: Evaluation,
    eval_cmd: str,
    eval_seconds: float,
    calibration: int = 0,
) -> str:
    """The MODEL_CARD.md text for one model and its held-out evaluation (``calibration``: the number of
    calibration studies the thresholds were chosen on, 0 when they were not calibrated)."""
    onnx_path = spec.model_dir / manifest.model.file
    size_kb = onnx_path.stat().st_size / 1024
    prov = manifest.provenance
    steps = "\n".join(
        f"{i + 1}. `{step.model_dump(exclude_none=True)}`" for i, step in enumerate(manifest.preprocessing)
    )
    labels = markdown_table(
        ["label", "output index", "code", "threshold", "triage"],
        [
            [
                lb.name + (" (normal class)" if lb.normal else ""),
                str(lb.index),
                f"{lb.code.scheme_designator} {lb.code.value} \u201c{lb.code.meaning}\u201d",
                f"{lb.threshold:g}",
                "yes" if lb.triage else "no",
            ]
            for lb in manifest.labels
        ],
    )
    strict, dilated, n_maps = ev.heatmap_rates()
    hm = manifest.heatmap
    if isinstance(hm, PatchHeatmap):
        heat = (
            f"patch classifier run over the whole preprocessed image ({model_grid(manifest)[0]}x"
            f"{model_grid(manifest)[1]}) in {hm.patch_size[0]}x{hm.patch_size[1]} tiles with stride "
            f"{hm.stride[0]}; the image score of each label is its maximum over the tiles and the map "
            "stitches the tile probabilities (overlaps averaged)"
        )
        margin_text = f"half the patch stride ({hm.stride[0] / 2:g} model pixels)"
    else:
        heat = (
            "class activation map computed in the graph (output `cam` = W_c f, shape (N, labels, 16, 16)); "
            "the per-location gradient of each logit sums to W_c over the locations for this head, so "
            "Grad-CAM equals this CAM up to scale and one forward pass gives it; the node upsamples it "
            "to the source image, undoes the letterbox/resize and normalises it (ReLU, divided by the max)"
        )
        margin_text = "half a CAM cell (4 model pixels, 1/32 of the input side)"
    pool_text = (
        "global average pooling of the per-location class evidence to the logits"
        if spec.pool == "avg"
        else "log-sum-exp pooling (a smooth maximum, r = 4) of the per-location class evidence to the "
        "logits, so that the evidence concentrates on the lesion rather than spreading over the organ"
    )
    if spec.null_normal:
        pool_text += (
            "; the normal class has no evidence map (its logit is a learned constant, its CAM zeros), so "
            "each finding's map alone carries the decision against normal"
        )
    agg = manifest.aggregation
    agg_text = {
        "image": f"image level (one {'photograph' if spec.kind in PHOTO_KINDS else 'radiograph'} per job)",
        "study": f"study level: {agg.method} over the views of the study",
        "series": f"series level: {agg.method}"
        + (f" (k={agg.k})" if agg.k else "")
        + f" over the slices; the top {agg.keep_top_slices} slices are kept for display",
    }[agg.level]
    rows = ev.table_rows()
    if calibration:
        threshold_text = (
            f"The thresholds were chosen on {calibration} separate calibration studies (base seed "
            f"{CALIB_SEED}, also disjoint from training) by maximising sensitivity + specificity."
        )
    else:
        threshold_text = "The thresholds are the defaults (0.5)."
    extra = ""
    if manifest.kind == "multi_class":
        extra = (
            "\nDecision accuracy over the classes (the most probable finding at or above its threshold, "
            f"else normal): {ev.class_accuracy():.3f}.\n"
        )
    photo_note = (
        "\n- The colour phantoms are drawn from a few simple shapes and colours (see the docstring of "
        f"`node/synth/{spec.kind}.py`); real photographs vary in camera, stain, illumination, focus "
        "and compression far beyond them, so held-out figures near 1.0 here say only that the model "
        "learned the phantoms' cues."
        if spec.kind in PHOTO_KINDS
        else ""
    )
    return f"""# Model card: {manifest.name} (`{manifest.id}` {manifest.version})

> **{RESEARCH}** {SYNTHETIC} Every output the node produces with this model is labelled as
> research use only. It has never seen a real patient image and must not be used for any clinical
> decision.

## Intended use

{manifest.intended_use}

{manifest.description}

Routing hints: modalities {", ".join(manifest.routing.modalities)}; body parts
{", ".join(manifest.routing.body_parts)}.

## Model

- Architecture: compact CNN (`models/train/net.py`, CamNet): 3x3 conv + BatchNorm + ReLU blocks with
  widths {spec.widths}, three 2x2 max-pools (features at 1/8 of the input), a linear head applied at
  every location of the feature map and {pool_text}; {_param_count(onnx_path):,} parameters.
- File: `model.onnx`, {size_kb:.0f} KiB, ONNX opset 17, dynamic batch axis, sha256
  `{manifest.model.sha256}`.
- Input `{manifest.input.name}`: float32 {manifest.input.layout} {list(manifest.input.shape)}.
- Outputs: `{manifest.outputs.probabilities}` (N, {len(manifest.labels)}) logits, activation
  `{manifest.outputs.activation}` applied by the node{
        "; `cam` (N, " + str(len(manifest.labels)) + ", 16, 16)" if manifest.outputs.cam else ""
    }.
- Kind: {manifest.kind}. Heatmap: {heat}.
- Aggregation: {agg_text}.

Preprocessing (run by the node from the manifest; training used the very same function,
`node.inference.preprocess.run_steps`, on the same steps):

{steps}

Labels:

{labels}

## Training data and procedure

- Data: {prov.data}.
- Phantoms: `node.synth` ({spec.kind}), rendered in memory with options `{spec.render_options}`;
  labels drawn uniformly over the label choices. No real patient data.
- Seed: {prov.seed}. Created {prov.created}. Framework: {prov.framework}.
- Reproduce: `.venv/bin/python {prov.training_script}` (CPU, 2 threads).

## Held-out evaluation (through the node's serving path)

{len(ev.cases)} held-out studies rendered as DICOM by `node.synth.generate_study`
(base seed {ev.base_seed}, disjoint from the training seeds; labels balanced over the label choices;
same render options as training), each analysed by `node.runner.analyse.analyse` with a CPU ONNX
Runtime session from `node.inference.runtime` after the registry's sha256 and I/O checks.
Scores are the node's aggregated {agg.level}-level probabilities; sensitivity, specificity and
accuracy use the manifest threshold. {threshold_text}

{markdown_table(TABLE_HEADER, rows)}
{extra}
Heatmap hit: the node's hotspot peak for the true finding lies inside one of that finding's lesion
boxes (ground truth from the phantom), on every positive image{
        " (for this series model: on the top slice the node shows first, which must contain the lesion)"
        if agg.level == "series"
        else ""
    }. "Dilated" grows each box by {margin_text} on every side, converted to source pixels;
"strict" uses the box as is. Overall: {dilated:.1%} dilated, {strict:.1%} strict over {n_maps} positive
images.

Reproduce: `{eval_cmd}` ({eval_seconds:.0f} s on 2 CPU cores).

## Limitations
{photo_note}
- Trained and evaluated on synthetic phantoms only; the phantoms are far simpler than real images
  (no real anatomy variants, artefacts, devices, implants or acquisition differences). Performance on
  real images is unknown and expected to be poor.
- Training and evaluation used phantoms rendered at reduced size (options `{spec.render_options}`) to
  keep them cheap; full-size studies go through the same manifest preprocessing (resize/letterbox),
  but this card's figures were not measured on them.
- The operating thresholds are set for the phantom distribution; they are not clinical operating
  points.
- It exists to exercise and test the node (routing, preprocessing, runtime, heatmaps, SR and SC
  outputs), not to diagnose.
"""


# ------------------------------------------------------------------------------------------------
# CLI


def _print_eval(ev: Evaluation, seconds: float) -> None:
    print(f"\n[{ev.model_id}] {len(ev.cases)} held-out studies (seed {ev.base_seed}) in {seconds:.0f}s")
    print(markdown_table(TABLE_HEADER, ev.table_rows()))
    if ev.manifest.kind == "multi_class":
        print(f"decision accuracy over the classes: {ev.class_accuracy():.3f}")
    strict, dilated, n = ev.heatmap_rates()
    print(f"heatmap peak in lesion box: {dilated:.1%} dilated, {strict:.1%} strict ({n} positive images)")


def _write(
    spec: Spec,
    ev: Evaluation,
    thresholds: dict[str, float] | None,
    cmd: str,
    seconds: float,
    calibration: int = 0,
) -> None:
    path = spec.model_dir / "manifest.yaml"
    old = yaml.safe_load(path.read_text(encoding="utf-8"))
    prov = old["provenance"]
    metrics = {
        k: v for k, v in prov.get("metrics", {}).items() if not k.startswith("heldout_")
    } | ev.metrics()
    metrics["heldout_eval_seconds"] = seconds
    if calibration:
        metrics["calibration_studies"] = float(calibration)
    write_manifest(
        spec,
        metrics,
        prov["data"],
        prov["seed"],
        thresholds=thresholds or {lb["name"]: lb["threshold"] for lb in old["labels"]},
        training_script=prov["training_script"],
        created=str(prov["created"]),
        heatmap=old["heatmap"],
    )
    model = load_model(spec.model_dir)  # re-validate what was written
    (spec.model_dir / "MODEL_CARD.md").write_text(
        model_card(spec, model.manifest, ev, cmd, seconds, calibration), encoding="utf-8"
    )
    print(f"[{spec.id}] wrote {path} and MODEL_CARD.md")


def main(argv: list[str] | None = None) -> int:
    """Command line: evaluate one or all models, optionally calibrate thresholds and write results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all", choices=["all", *sorted(SPECS)])
    p.add_argument("--n", type=int, default=120, help="held-out studies per model")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="base seed of the held-out set")
    p.add_argument(
        "--calibrate",
        type=int,
        default=0,
        metavar="N",
        help="first choose thresholds (Youden) on N calibration studies (seed CALIB_SEED)",
    )
    p.add_argument("--write", action="store_true", help="write metrics into manifest.yaml and MODEL_CARD.md")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    ids = sorted(SPECS) if args.model == "all" else [args.model]
    for model_id in ids:
        spec = SPECS[model_id]
        thresholds = None
        if args.calibrate:
            model, session = open_model(model_id, threads=args.threads)
            t0 = time.monotonic()
            cal = evaluate_model(spec, model, session, args.calibrate, CALIB_SEED)
            thresholds = youden_thresholds(cal)
            print(f"[{model_id}] calibration on {args.calibrate} studies ({time.monotonic() - t0:.0f}s):")
            for label in cal.findings:
                print(
                    f"  {label}: AUC {cal.label_metrics(label)['auc']:.3f}, threshold {thresholds[label]:.3f}"
                )
            if args.write:
                old = yaml.safe_load((spec.model_dir / "manifest.yaml").read_text(encoding="utf-8"))
                prov = old["provenance"]
                write_manifest(
                    spec,
                    prov.get("metrics", {}),
                    prov["data"],
                    prov["seed"],
                    thresholds=thresholds,
                    training_script=prov["training_script"],
                    created=str(prov["created"]),
                    heatmap=old["heatmap"],
                )
        model, session = open_model(model_id, threads=args.threads)
        if thresholds and not args.write:  # evaluate with the calibrated thresholds in memory
            labels = [
                lb.model_copy(update={"threshold": thresholds.get(lb.name, lb.threshold)})
                for lb in model.manifest.labels
            ]
            model = LoadedModel(
                model.manifest.model_copy(update={"labels": labels}),
                model.directory,
                model.onnx_path,
                model.inputs,
                model.outputs,
            )
        t0 = time.monotonic()
        ev = evaluate_model(spec, model, session, args.n, args.seed)
        seconds = time.monotonic() - t0
        _print_eval(ev, seconds)
        if args.write:
            cmd = f".venv/bin/python models/train/evaluate.py --model {model_id} --n {args.n}"
            cmd += f" --seed {args.seed}" if args.seed != EVAL_SEED else ""
            cmd += f" --calibrate {args.calibrate}" if args.calibrate else ""
            _write(spec, ev, thresholds, cmd, seconds, args.calibrate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
