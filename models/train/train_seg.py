"""Train the reference segmentation model (liver lesions on CT phantoms) and export it to ONNX.

    .venv/bin/python models/train/train_seg.py --n 500 --steps 700

Data: abdominal CT phantoms rendered in memory by ``node.synth`` (the generator knows each lesion's
mask), every slice passed through the node's own ``run_steps`` with the manifest's preprocessing;
targets are per-pixel classes (0 background, 1 cyst, 2 mass) resized to the model input (nearest).
Evaluation on held-out phantoms (another seed) runs the ONNX file with ONNX Runtime and the node's
own post-processing (``segment_masks``): Dice per class over each study's volume. CPU only, fixed
seeds, 2 threads.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import yaml
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.train.common import (  # noqa: E402
    ONNX_ROOT,
    RESEARCH,
    SPECS,
    SYNTHETIC,
    TRAIN_SEED,
    header_for,
    study_seeds,
)
from models.train.net import UNet, export_unet_onnx  # noqa: E402
from node.files import sha256_file  # noqa: E402
from node.inference.manifest import Manifest, parse_manifest  # noqa: E402
from node.inference.postprocess import dice, pixel_probabilities, segment_masks  # noqa: E402
from node.inference.preprocess import run_steps  # noqa: E402
from node.synth import RenderedImage, render_study  # noqa: E402

log = logging.getLogger("train_seg")

MODEL_ID = "ct-liver-seg"
MODEL_DIR = ONNX_ROOT / MODEL_ID
INPUT_HW = (128, 128)
WIDTHS = (8, 16, 32)
CROP = 64  # training crops (the network is fully convolutional: it serves whole 128x128 slices)
RENDER = {"slices": 40, "size": 128}
HELDOUT_SEED = 5550123
#: phantom lesion label -> class index of the per-pixel output
CLASSES = {"benign": 1, "malignant": 2}
CATEGORY = {"value": "49755003", "scheme_designator": "SCT", "meaning": "Morphologically abnormal structure"}
LABELS: list[dict[str, Any]] = [
    {
        "name": "cyst",
        "index": 1,
        "code": {"value": "367643001", "scheme_designator": "SCT", "meaning": "Cyst"},
        "category": CATEGORY,
        "threshold": 0.5,
        "triage": False,
    },
    {
        "name": "mass",
        "index": 2,
        "code": {"value": "4147007", "scheme_designator": "SCT", "meaning": "Mass"},
        "category": CATEGORY,
        "threshold": 0.5,
        "triage": True,
    },
]


def manifest_dict(
    sha256: str = "0" * 64, metrics: dict[str, float] | None = None, data: str = "", script: str = ""
) -> dict[str, Any]:
    """The manifest of the segmentation model as plain data (validated by ``parse_manifest``)."""
    return {
        "manifest_version": 1,
        "id": MODEL_ID,
        "name": "CT liver lesion segmentation",
        "version": "1.0.0",
        "description": "2-D U-Net segmenting liver cysts and liver masses on axial contrast CT slices "
        f"(contrast-enhanced liver window C80/W200 HU); writes a DICOM Segmentation. {SYNTHETIC}",
        "research_use_only": True,
        "intended_use": f"{RESEARCH} Axial abdominal CT series (portal venous phase).",
        "provenance": {
            "training_script": script or "models/train/train_seg.py",
            "data": data or "synthetic ct phantoms from node.synth",
            "seed": TRAIN_SEED,
            "created": dt.date.today().isoformat(),
            "metrics": {k: round(float(v), 4) for k, v in (metrics or {}).items()},
            "framework": "torch 2.13 (CPU) -> ONNX opset 17",
        },
        "model": {"file": "model.onnx", "sha256": sha256},
        "input": {"name": "image", "shape": [None, 1, *INPUT_HW], "dtype": "float32", "layout": "NCHW"},
        "preprocessing": SPECS["ct-liver"].steps,
        "outputs": {"probabilities": "logits", "activation": "softmax"},
        "kind": "segmentation",
        "labels": LABELS,
        "heatmap": {"method": "none"},
        "aggregation": {"level": "series", "method": "max", "keep_top_slices": 3},
        "segmentation": {
            "dimensions": 2,
            "background_index": 0,
            "min_area_px": 15,
            "batch_size": 16,
            "series_description": "AI liver lesion segmentation",
            "anatomic_region": {"value": "10200004", "scheme_designator": "SCT", "meaning": "Liver"},
        },
        "routing": {"modalities": ["CT"], "body_parts": ["ABDOMEN", "LIVER"]},
    }


def manifest() -> Manifest:
    """The validated manifest (placeholder sha) whose steps the data pipeline runs."""
    return parse_manifest(manifest_dict(), f"spec {MODEL_ID}")


def prepare(man: Manifest, image: RenderedImage) -> np.ndarray:
    """One slice through the node's preprocessing: (1, H, W) float32."""
    mi = run_steps(
        image.pixels,
        header_for(image, "CT"),
        man.preprocessing,
        layout="NCHW",
        dtype="float32",
        expected_hw=man.input.spatial,
        expected_channels=1,
    )
    return mi.tensor[0]


def target(image: RenderedImage, hw: tuple[int, int] | None = None) -> np.ndarray:
    """Per-pixel classes (0 background, 1 cyst, 2 mass) of one slice, in stored pixels (or resized
    to ``hw`` with nearest-neighbour)."""
    out = np.zeros(image.mask.shape, dtype=np.uint8)
    for box in image.boxes:
        out[image.mask == box.lesion] = CLASSES[box.label]
    if hw is not None and out.shape != hw:
        out = cv2.resize(out, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
    return out


def build_data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Slices of ``n`` phantom studies: every slice showing a lesion, a sample of the others."""
    man = manifest()
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for s in study_seeds(seed, n):
        study = render_study("ct", s, None, **RENDER)
        for image in study.images:
            if not image.boxes and rng.random() > 0.3:
                continue
            xs.append(prepare(man, image))
            ys.append(target(image, INPUT_HW))
    return np.stack(xs).astype(np.float32), np.stack(ys).astype(np.int64)


def _crops(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """``bs`` CROP x CROP crops: 70 % centred near a lesion pixel (when the slice has one), else anywhere."""
    h, w = y.shape[1:]
    xb = np.empty((bs, 1, CROP, CROP), np.float32)
    yb = np.empty((bs, CROP, CROP), np.int64)
    for k, i in enumerate(rng.integers(0, len(x), size=bs)):
        lesion = np.argwhere(y[i] > 0)
        if lesion.size and rng.random() < 0.7:
            cy, cx = lesion[rng.integers(len(lesion))] + rng.integers(-20, 21, size=2)
        else:
            cy, cx = rng.integers(0, h), rng.integers(0, w)
        oy = int(np.clip(cy - CROP // 2, 0, h - CROP))
        ox = int(np.clip(cx - CROP // 2, 0, w - CROP))
        xb[k] = x[i, :, oy : oy + CROP, ox : ox + CROP]
        yb[k] = y[i, oy : oy + CROP, ox : ox + CROP]
    return xb, yb


def train(x: np.ndarray, y: np.ndarray, steps: int, seed: int, bs: int = 16) -> UNet:
    """AdamW with a cosine schedule on cross-entropy (class-weighted) + soft Dice of the lesion
    classes, on random crops (see ``_crops``)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = UNet(3, WIDTHS)
    opt = torch.optim.AdamW(net.parameters(), lr=4e-3, weight_decay=1e-4)
    counts = np.bincount(y.reshape(-1), minlength=3).astype(np.float64)
    weights = np.clip(np.sqrt(counts.sum() / np.maximum(counts, 1)), 1.0, 30.0)
    ce = nn.CrossEntropyLoss(weight=torch.tensor(weights / weights.min(), dtype=torch.float32))
    log.info("pixel counts %s, CE weights %s", counts.astype(int).tolist(), np.round(weights, 2).tolist())
    t0 = time.time()
    net.train()
    for step in range(1, steps + 1):
        xb, yb = _crops(x, y, rng, bs)
        xt, yt = torch.from_numpy(xb), torch.from_numpy(yb)
        logits = net(xt)
        prob = torch.softmax(logits, dim=1)[:, 1:]
        onehot = nn.functional.one_hot(yt, 3).permute(0, 3, 1, 2)[:, 1:].float()
        inter = (prob * onehot).sum(dim=(0, 2, 3))
        soft_dice = 1 - (2 * inter + 1) / (prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3)) + 1)
        loss = ce(logits, yt) + soft_dice.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = 4e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        if step % 50 == 0 or step == steps:
            log.info("step %d/%d loss %.4f (%.0fs)", step, steps, float(loss.detach()), time.time() - t0)
    net.eval()
    return net


def evaluate(onnx_path: Path, man: Manifest, seed: int, n: int) -> dict[str, float]:
    """Held-out figures through ONNX Runtime and the node's post-processing, per study volume.

    ``heldout_dice_<label>``: mean Dice over the studies whose truth has that class;
    ``heldout_pooled_dice_<label>``: Dice over every voxel of every study pooled;
    ``heldout_dice_lesion``: any lesion vs background, mean over the studies with a lesion;
    ``heldout_sensitivity`` / ``heldout_specificity``: a study is called positive when any lesion
    pixel remains; ``heldout_wrong_class_studies``: studies with pixels of a class their truth lacks."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    per_label: dict[str, list[float]] = {lb.name: [] for lb in man.labels}
    pooled = {lb.name: [0, 0] for lb in man.labels}  # (2 * overlap, predicted + truth)
    lesion, tp, fn, tn, fp, wrong = [], 0, 0, 0, 0, 0
    for s in study_seeds(seed, n):
        study = render_study("ct", s, None, **RENDER)
        x = np.stack([prepare(man, im) for im in study.images])
        probs = pixel_probabilities(man, sess.run(["logits"], {"image": x})[0])
        pred = np.stack([segment_masks(man, p) for p in probs])  # (slices, labels, H, W)
        truth = np.stack([target(im, INPUT_HW) for im in study.images])
        for i, lb in enumerate(man.labels):
            t = truth == lb.index
            pooled[lb.name][0] += 2 * int(np.logical_and(pred[:, i], t).sum())
            pooled[lb.name][1] += int(pred[:, i].sum()) + int(t.sum())
            if t.any():
                per_label[lb.name].append(dice(pred[:, i], t))
            elif pred[:, i].any():
                wrong += 1
        any_pred, any_truth = pred.any(axis=1), truth > 0
        if any_truth.any():
            lesion.append(dice(any_pred, any_truth))
            tp, fn = tp + int(any_pred.any()), fn + int(not any_pred.any())
        else:
            tn, fp = tn + int(not any_pred.any()), fp + int(any_pred.any())
    metrics = {f"heldout_dice_{k}": float(np.mean(v)) for k, v in per_label.items() if v}
    metrics |= {f"heldout_pooled_dice_{k}": v[0] / max(v[1], 1) for k, v in pooled.items()}
    metrics |= {f"heldout_studies_{k}": float(len(v)) for k, v in per_label.items()}
    metrics["heldout_dice_lesion"] = float(np.mean(lesion))
    metrics["heldout_sensitivity"] = tp / max(tp + fn, 1)
    metrics["heldout_specificity"] = tn / max(tn + fp, 1)
    metrics["heldout_wrong_class_studies"] = float(wrong)
    metrics["heldout_studies"] = float(n)
    metrics["heldout_seed"] = float(seed)
    return metrics


def write_manifest(metrics: dict[str, float], data: str, script: str) -> Path:
    """``manifest.yaml`` beside the exported model, with its sha256 (validated first)."""
    data_dict = manifest_dict(sha256_file(MODEL_DIR / "model.onnx"), metrics, data, script)
    parse_manifest(data_dict, f"{MODEL_ID} manifest")
    out = MODEL_DIR / "manifest.yaml"
    header = (
        f"# CT liver lesion segmentation.\n# {RESEARCH} {SYNTHETIC}\n"
        "# Written by models/train/train_seg.py; see MODEL_CARD.md.\n"
    )
    out.write_text(header + yaml.safe_dump(data_dict, sort_keys=False, width=100), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: render, train, export, evaluate on held-out phantoms, write the manifest."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="training studies to render")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--seed", type=int, default=TRAIN_SEED)
    p.add_argument("--heldout", type=int, default=60, help="held-out studies (seed 5550123)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)
    t0 = time.time()
    x, y = build_data(args.seed, args.n)
    t_data = time.time() - t0
    log.info("%d slices %s in %.0fs", len(x), x.shape[1:], t_data)
    t1 = time.time()
    net = train(x, y, args.steps, args.seed)
    t_train = time.time() - t1
    onnx_path = MODEL_DIR / "model.onnx"
    export_unet_onnx(net, onnx_path, INPUT_HW)
    t2 = time.time()
    metrics = evaluate(onnx_path, manifest(), HELDOUT_SEED, args.heldout)
    metrics["heldout_eval_seconds"] = time.time() - t2
    log.info("held-out: %s", {k: round(v, 4) for k, v in metrics.items()})
    data = (
        f"{args.n} synthetic ct phantom studies (node.synth, options {RENDER}, seed {args.seed}) -> "
        f"{len(x)} slices (every lesion slice, 30% of the others); {args.steps} AdamW steps of batch 16 "
        f"({CROP}x{CROP} crops); "
        f"data {t_data:.0f}s, training {t_train:.0f}s on 2 CPU threads"
    )
    script = f"models/train/train_seg.py --n {args.n} --steps {args.steps} --seed {args.seed}"
    write_manifest(metrics, data, script)
    log.info("exported %s (%d bytes)", onnx_path, onnx_path.stat().st_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
