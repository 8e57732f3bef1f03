"""Train one reference model on synthetic phantoms and export it to ONNX with its manifest.

    .venv/bin/python models/train/train.py --model cxr --n 4000 --steps 900
    .venv/bin/python models/train/train.py --model cxr --n 4000 --minutes 6   # time-budgeted

The exact command of each bundled model is in its manifest (``provenance.training_script``).

Data: phantoms rendered in memory by ``node.synth`` and passed through the node's own
``run_steps`` with the manifest's preprocessing steps (see ``common.py``). CPU only, fixed seeds.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.train.common import (  # noqa: E402
    PHOTO_KINDS,
    SPECS,
    TRAIN_SEED,
    Spec,
    box_in_model,
    image_target,
    lesion_area,
    manifest,
    preprocess,
    render,
    study_seeds,
    write_manifest,
)
from models.train.net import CamNet, export_onnx  # noqa: E402
from node.inference.manifest import Manifest  # noqa: E402
from node.synth import RenderedStudy  # noqa: E402

MIN_SLICE_AREA = 12  # stored pixels of lesion needed for a training slice to count as positive
JITTER = 20  # mammo: max offset (model pixels) of a lesion patch's centre from the lesion's centre


def _mammo_patches(
    spec: Spec, man: Manifest, study: RenderedStudy, rng: np.random.Generator
) -> tuple[list, list]:
    """Patches around every lesion (jittered) and lesion-free background patches from each view."""
    ph, pw = spec.input_hw
    xs, ys = [], []
    names = spec.label_names
    for image in study.images:
        mi = preprocess(spec, man, image, check_size=False)
        img = mi.tensor[0]  # (1, H, W)
        _, h, w = img.shape
        geom = mi.geometry
        # lesion mask in model pixels (nearest), for clean negatives
        mh, mw = image.mask.shape
        ys_idx = np.clip(((np.arange(h) + 0.5 - geom.offset_y) / geom.scale_y).astype(int), 0, mh - 1)
        xs_idx = np.clip(((np.arange(w) + 0.5 - geom.offset_x) / geom.scale_x).astype(int), 0, mw - 1)
        mask_m = image.mask[np.ix_(ys_idx, xs_idx)] > 0
        for box in image.boxes:
            y0, x0, y1, x1 = box_in_model(box, geom)
            cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
            for _ in range(4):
                oy = int(np.clip(round(cy - ph / 2 + rng.uniform(-JITTER, JITTER)), 0, h - ph))
                ox = int(np.clip(round(cx - pw / 2 + rng.uniform(-JITTER, JITTER)), 0, w - pw))
                xs.append(img[:, oy : oy + ph, ox : ox + pw])
                ys.append(names.index(box.label))
        tissue = np.argwhere(img[0] > -1.6)
        n_neg = 8 if not image.boxes else 4
        tries = 0
        while n_neg > 0 and tries < 80:
            tries += 1
            if tissue.size and rng.random() < 0.85:
                cy, cx = tissue[rng.integers(len(tissue))]
            else:
                cy, cx = rng.integers(h), rng.integers(w)
            oy = int(np.clip(cy - ph // 2, 0, h - ph))
            ox = int(np.clip(cx - pw // 2, 0, w - pw))
            if mask_m[oy : oy + ph, ox : ox + pw].any():
                continue
            xs.append(img[:, oy : oy + ph, ox : ox + pw])
            ys.append(0)
            n_neg -= 1
    return xs, ys


def build_data(spec: Spec, seed: int, n: int, log_every: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Render ``n`` studies from ``seed`` and turn them into model tensors and targets."""
    man = manifest(spec)
    rng = np.random.default_rng(seed)
    xs: list[np.ndarray] = []
    ys: list = []
    t0 = time.time()
    for i, s in enumerate(study_seeds(seed, n)):
        study = render(spec, s)
        if spec.kind == "cxr":
            mi = preprocess(spec, man, study.images[0])
            xs.append(mi.tensor[0])
            ys.append(np.array([1.0 if n_ in study.labels else 0.0 for n_ in spec.label_names], np.float32))
        elif spec.kind in PHOTO_KINDS:  # one photograph per study, its class the study label
            xs.append(preprocess(spec, man, study.images[0]).tensor[0])
            ys.append(spec.label_names.index(study.labels[0]))
        elif spec.kind == "mammo":
            px, py = _mammo_patches(spec, man, study, rng)
            xs += px
            ys += py
        else:
            for image in study.images:
                target = image_target(spec, image)
                if target != 0 and lesion_area(image) < MIN_SLICE_AREA:
                    continue  # too little lesion to learn from: left out of training
                if target == 0 and study.labels[0] != "normal" and rng.random() < 0.5:
                    continue
                if target == 0 and rng.random() < 0.5:
                    continue
                xs.append(preprocess(spec, man, image).tensor[0])
                ys.append(target)
        if (i + 1) % log_every == 0:
            print(f"  rendered {i + 1}/{n} studies, {len(xs)} examples, {time.time() - t0:.0f}s", flush=True)
    x = np.stack(xs).astype(np.float32)
    y = np.stack(ys) if spec.multi_label else np.asarray(ys, dtype=np.int64)
    return x, y


def train(
    spec: Spec, x: np.ndarray, y: np.ndarray, seconds: float, seed: int, steps: int | None = None
) -> tuple[CamNet, int]:
    """Train a CamNet on ``x``/``y`` with AdamW and a cosine schedule; return it and the steps run.

    ``steps`` fixes the number of optimiser steps (reproducible); without it the count is derived
    from the time budget ``seconds`` after 20 timed steps.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    null = None
    if spec.null_normal:
        null = next(i for i, lb in enumerate(spec.labels) if lb.get("normal"))
    net = CamNet(spec.n_out, spec.widths, in_ch=spec.channels, pool=spec.pool, null_class=null)  # type: ignore[arg-type]
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    if spec.multi_label:
        loss_fn: nn.Module = nn.BCEWithLogitsLoss()
    else:
        counts = np.bincount(y, minlength=spec.n_out).astype(np.float64)
        weights = np.sqrt(counts.sum() / np.maximum(counts, 1))
        loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(weights / weights.mean(), dtype=torch.float32))
        print(f"  class counts {counts.astype(int).tolist()}")
    flip_v = spec.kind == "mammo" or spec.kind in PHOTO_KINDS
    flip_h = spec.kind != "ct"
    bs = 64
    n = len(x)
    t0 = time.time()
    step, total = 0, steps
    epoch = 0
    while True:
        order = rng.permutation(n)
        run_loss, run_n = 0.0, 0
        for start in range(0, n - bs + 1, bs):
            idx = order[start : start + bs]
            xb = x[idx].copy()
            if flip_h:
                m = rng.random(bs) < 0.5
                xb[m] = xb[m][..., ::-1]
            if flip_v:
                m = rng.random(bs) < 0.5
                xb[m] = xb[m][..., ::-1, :]
            xt = torch.from_numpy(np.ascontiguousarray(xb))
            yt = torch.from_numpy(y[idx])
            net.train()
            loss = loss_fn(net(xt), yt)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            run_loss += float(loss.detach()) * bs
            run_n += bs
            elapsed = time.time() - t0
            if steps is None and step == 20:
                total = max(40, int(seconds / (elapsed / step)))
                print(f"  {elapsed / step:.3f}s/step -> {total} steps (~{total * bs / n:.1f} epochs)")
            frac = step / total if total else 0.0
            for g in opt.param_groups:
                g["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
            if total is not None and step >= total:
                print(f"  epoch {epoch} loss {run_loss / max(run_n, 1):.4f}; done in {elapsed:.0f}s")
                return net, step
        print(f"  epoch {epoch} loss {run_loss / max(run_n, 1):.4f} ({time.time() - t0:.0f}s)", flush=True)
        epoch += 1


def main(argv: list[str] | None = None) -> int:
    """Command line: render the training set, train, export ONNX and write the manifest."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(SPECS))
    p.add_argument("--n", type=int, default=1000, help="training studies to render")
    p.add_argument("--minutes", type=float, default=6.0, help="training time budget")
    p.add_argument("--seed", type=int, default=TRAIN_SEED)
    p.add_argument("--steps", type=int, default=None, help="fixed optimiser steps (overrides --minutes)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    spec = SPECS[args.model]
    t0 = time.time()
    print(f"[{spec.id}] rendering {args.n} studies (seed {args.seed})", flush=True)
    x, y = build_data(spec, args.seed, args.n)
    t_data = time.time() - t0
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes} min"
    print(f"[{spec.id}] {len(x)} examples {x.shape[1:]} in {t_data:.0f}s; training {budget}", flush=True)
    t1 = time.time()
    net, steps = train(spec, x, y, args.minutes * 60, args.seed, args.steps)
    t_train = time.time() - t1
    onnx_path = spec.model_dir / "model.onnx"
    export_onnx(net, onnx_path, spec.input_hw, with_cam=spec.heatmap["method"] == "cam", in_ch=spec.channels)
    data = (
        f"{args.n} synthetic {spec.kind} phantom studies (node.synth, options {spec.render_options}, "
        f"seed {args.seed}) -> {len(x)} training examples; {steps} AdamW steps of batch 64 "
        f"(reproduce with --n {args.n} --steps {steps}); data {t_data:.0f}s, training {t_train:.0f}s "
        "on 2 CPU threads"
    )
    script = f"models/train/train.py --model {spec.id} --n {args.n} --seed {args.seed} --steps {steps}"
    write_manifest(spec, {}, data, args.seed, training_script=script)
    print(f"[{spec.id}] exported {onnx_path} ({onnx_path.stat().st_size} bytes); train {t_train:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
