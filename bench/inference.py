"""Inference benchmark: the node's decode → preprocess → infer path ÷ bare onnxruntime.

For each reference model in ``models/onnx``, a phantom study of the model's kind is generated
(node.synth) and pushed through the node's own path, as the runner does it
(``node.runner.analyse.prepare_and_infer``: read + decode + ``prepare`` per file in the node's
preparation processes, a ``PreparePool`` sized as the node sizes it (one per core, at least
runner.workers + 1 = 3), the frames handed to the model through a ``SessionBatcher`` while the
rest are prepared; the patch tiler for patch models). ``--in-process`` prepares in the bench's
own process instead (``limits.decode_memory_mib: 0``); ``--niceness`` sets the processes' priority
(default the node's ``limits.prepare_niceness``; 0 as before it existed). On the CUDA provider the frames are
prepared on the GPU where that is usable (``node.inference.gpu_prepare``, as the node does with
``models.gpu_preparation`` on); ``--cpu-prepare`` keeps them in the preparation processes.
Every array that the node hands to ``ModelSession.run`` is recorded; the bare baseline then
runs the same ONNX file in a plain ``onnxruntime.InferenceSession`` (same provider, same
thread settings) over exactly those already-prepared arrays, all of them in chunks of
``max_batch`` (padded when the graph's batch is fixed): the batching most favourable to the
bare side. images/s = source images per second; the
ratio node ÷ bare shows what decode and preprocessing cost on top of the model itself. "prep
ms/img" is preparation alone on one core (``prepare_all`` in this process). Heatmaps/explain and
outputs are not included.

``--real`` adds real-size architectures beside the tiny references, built at bench time into the
temporary folder (random weights, nothing downloaded or committed) by ``pacs-node convert torch``
with its parity check: ``resnet50-224`` (torchvision-layout ResNet-50, 23.5 M parameters,
3x224x224, GAP + linear with the CAM output), ``resnet50-224-plain`` (the same network converted
without a CAM output, its manifest's ``heatmap: none``, as a model owner's plain classifier or a
converted MONAI bundle is: no display of its images is made) and ``densenet121-224``
(torchvision-layout DenseNet-121), all fed full-size chest radiograph phantoms through the
scaffold's chest preprocessing (window, letterbox to 224, normalise, 3 channels). The segmentation
model (``ct-liver-seg``, a 2-D U-Net run slice by slice) goes through the whole segmentation
analysis: per-pixel classes mapped back to the source pixels and post-processed are node cost;
``--models ct-liver-seg --images 300`` measures it over a 300-slice CT.

``--models unet3d-ct`` (or ``--real3d``) adds a 3-D segmentation model built at bench time (random
weights, nothing committed): MONAI's UNet with ``spatial_dims=3``, channels (16, 32, 64, 128),
strides 2, one residual unit, exported to ONNX by torch with dynamic spatial axes, behind the
ct-liver-seg preprocessing resized to 192x192 in-plane, roi 64x128x128, overlap 0.25, gaussian
blend, 2 windows per call. Its node path is the whole 3-D segmentation analysis (every slice
decoded and prepared, stacked, sliding-window inference, blended, mapped back per slice,
26-connected components removed, measured); the bare path runs the same windows in the same
calls; images/s counts slices. ``--models unet3d-ct --images 300 --repeat 1`` is a 300-slice CT
(512x512): 24 windows in 12 calls; on the shared 2-core CI machine node 22.9 vs bare 98.2 slices/s,
0.23 (0.18-0.25 over four runs under varying load). With random weights the masks are millions of
fragmented voxels, so the 26-connected removal (about a third of the node's time) costs far more
than for a trained model's compact masks; mapping 300 slices x 3 classes back to 512x512 and
decoding/preparing them make most of the rest.

    .venv/bin/python bench/inference.py [--images 16] [--repeat 3] [--provider cpu|cuda|all] [--real]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from node.inference.device_arrays import to_host  # noqa: E402
from node.inference.gpu_prepare import make_gpu_preparer  # noqa: E402
from node.inference.isolate import PreparePool  # noqa: E402
from node.inference.manifest import PatchHeatmap  # noqa: E402
from node.inference.registry import LoadedModel, load_registry  # noqa: E402
from node.inference.runtime import (  # noqa: E402
    CPU,
    CUDA,
    ModelSession,
    RuntimeConfig,
    create_session,
    missing_cuda_library,
    open_session,
)
from node.runner.analyse import Stopwatch, analyse, prepare_all, prepare_and_infer  # noqa: E402
from node.settings import LimitsSettings  # noqa: E402
from node.synth import generate_study  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KIND = {"ct-liver": "ct", "ct-liver-seg": "ct", "cxr": "cxr", "mammo": "mammo", "mr-brain": "mr"}
#: Real-size architectures (``--real``): model id -> factory in tests/byom/archs.py, input C,H,W.
REAL = {
    "resnet50-224": ("resnet50", (3, 224, 224)),
    "resnet50-224-plain": ("resnet50", (3, 224, 224)),  # no CAM output, heatmap: none
    "densenet121-224": ("densenet121", (3, 224, 224)),
}
#: 3-D segmentation models built at bench time (``--real3d``): id -> (UNet channels, roi, in-plane size).
REAL3D = {"unet3d-ct": ((16, 32, 64, 128), (64, 128, 128), 192)}


class Recording:
    """A ModelSession stand-in that records each batch the node passes to ``run``."""

    def __init__(self, session: ModelSession) -> None:
        self.session = session
        self.calls: list[tuple[np.ndarray, tuple[str, ...] | None]] = []

    def run(self, batch: np.ndarray, outputs=None) -> dict[str, np.ndarray]:  # noqa: ANN001
        host = to_host(batch)  # a GPU-prepared batch is recorded on the host for the bare side
        self.calls.append((np.ascontiguousarray(host, dtype=self.session.input_dtype), outputs))
        return self.session.run(batch, outputs)

    def __getattr__(self, name: str) -> object:
        return getattr(self.session, name)


def study_files(kind: str, folder: Path, images: int) -> list[Path]:
    """At least ``images`` DICOM files of ``kind`` (several studies for 1-4-image kinds)."""
    files: list[Path] = []
    seed = 0
    while len(files) < images:
        options = {"slices": images} if kind in ("ct", "mr") else {}
        out = folder / f"{kind}-{seed}"
        generate_study(kind, out, seed, None, write_masks=False, **options)
        files += sorted(out.glob("*.dcm"))
        seed += 1
    return files[:images]


def node_path(model: LoadedModel, session: ModelSession, files: list[Path], pool: PreparePool | None) -> list:
    """One pass of the node's path; returns the recorded session calls."""
    rec = Recording(session)
    if model.manifest.kind == "segmentation":  # per-pixel classes mapped back and post-processed
        watch = Stopwatch(deadline=time.monotonic() + 3600)
        analyse(model, rec, files, level="series", uid_seed="bench", watch=watch, preparer=pool)  # type: ignore[arg-type]
        return rec.calls
    is_patch = isinstance(model.manifest.heatmap, PatchHeatmap)
    prepare_and_infer(files, model.manifest, rec, is_patch, preparer=pool)  # type: ignore[arg-type]
    return rec.calls


def bare_path(
    sess: ort.InferenceSession,
    input_name: str,
    calls: list,
    default_outputs: list[str],
    max_batch: int,
    fixed: int | None,
) -> None:
    """The same arrays through a plain InferenceSession: consecutive calls fetching the same
    outputs packed into chunks of up to ``max_batch`` rows (a call of more is cut)."""
    chunks: list[tuple[list[str], list[np.ndarray]]] = []
    rows = 0
    for batch, outputs in calls:
        names = list(outputs) if outputs is not None else default_outputs
        for start in range(0, batch.shape[0], max_batch):
            part = batch[start : start + max_batch]
            if not chunks or chunks[-1][0] != names or rows + part.shape[0] > max_batch:
                chunks.append((names, []))
                rows = 0
            chunks[-1][1].append(part)
            rows += part.shape[0]
    for names, parts in chunks:
        chunk = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if fixed is not None and chunk.shape[0] < fixed:
            pad = np.zeros((fixed - chunk.shape[0], *chunk.shape[1:]), dtype=chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        sess.run(names, {input_name: chunk})


def best(fn, repeat: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def machine() -> str:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem = next((int(line.split()[1]) // (1024 * 1024) for line in meminfo if line.startswith("MemTotal")), 0)
    gpu = "no GPU"
    if missing_cuda_library() is None and CUDA in ort.get_available_providers():
        try:
            import subprocess

            gpu = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                ).stdout.strip()
                or "GPU"
            )
        except OSError:
            gpu = "GPU"
    return (
        f"{os.cpu_count()} cores, {mem} GiB, {gpu}; {platform.processor() or platform.machine()}; "
        f"python {sys.version.split()[0]}, onnxruntime {ort.__version__}; {time.strftime('%Y-%m-%d')}"
    )


def measure(
    model: LoadedModel,
    files: list[Path],
    provider: str,
    max_batch: int,
    repeat: int,
    pool: PreparePool | None,
    gpu_prepare: bool = True,
) -> str:
    """One table row: node path vs bare ORT for one model and provider (on CUDA with the
    frames prepared on the GPU where that is usable, as the node does, unless ``gpu_prepare``
    is off)."""
    config = RuntimeConfig(providers=(provider,), max_batch=max_batch)
    session = create_session(model, config)
    if gpu_prepare and session.active_provider == CUDA:  # as the node: the GPU preparer where usable
        pool = make_gpu_preparer(session.active_provider, cpu=pool) or pool  # type: ignore[assignment]
    calls = node_path(model, session, files, pool)  # warm: page cache, arenas, the pool's processes
    bare = open_session(model.onnx_path, config, model.id)
    outs = list(session.output_names)
    mb, fixed = session.max_batch, model.fixed_batch
    bare_path(bare, session.input_name, calls, outs, mb, fixed)  # warm
    # node and bare passes alternate, so that a change in the machine's load meets both sides
    node_s, bare_s = float("inf"), float("inf")
    for _ in range(repeat):
        node_s = min(node_s, best(lambda: node_path(model, session, files, pool), 1))
        bare_s = min(bare_s, best(lambda: bare_path(bare, session.input_name, calls, outs, mb, fixed), 1))
    is_patch = isinstance(model.manifest.heatmap, PatchHeatmap)
    prep_s = best(lambda: prepare_all(files, model.manifest, is_patch), repeat)
    n = len(files)
    runs = len(calls)  # the node's runs (the bare side runs the same rows in full chunks)
    batch = max(b.shape[0] for b, _ in calls)
    return (
        f"{model.id:<20}{provider.replace('ExecutionProvider', ''):<10}{n:>7}{runs:>6}"
        f"{min(batch, mb):>7}{n / node_s:>12.1f}{n / bare_s:>12.1f}"
        f"{bare_s / node_s:>13.2f}{prep_s / n * 1000:>13.1f}"
    )


def build_real(model_id: str, folder: Path) -> LoadedModel:
    """Convert a real-size architecture (random weights, fixed seed) into ``folder/<id>`` with the
    converter's parity check, fill its manifest as a user would, and load it."""
    import torch

    from converters.cli import convert_torch
    from node.inference.registry import load_model
    from tests.byom import archs
    from tests.byom.conftest import fill_manifest

    factory, shape = REAL[model_id]
    cam = not model_id.endswith("-plain")
    weights = folder / f"{model_id}.pt"
    torch.save(getattr(archs, factory)().state_dict(), weights)
    out = folder / model_id
    result = convert_torch(
        out_dir=out,
        model=f"tests.byom.archs:{factory}",
        weights=weights,
        input_shape=shape,
        model_id=model_id,
        cam=cam,
        echo=lambda line: None,
        threads=os.cpu_count() or 1,
    )
    if not result.ok:
        sys.exit(f"{model_id}: parity failed; not benchmarking it")
    # the scaffold's chest preprocessing; its CAM, or no heatmap (not the scaffold's occlusion map,
    # which would run the network ~200 times an image)
    fill_manifest(out, labels=["finding_a", "finding_b"], **({} if cam else {"heatmap": {"method": "none"}}))
    return load_model(out)


def build_real3d(model_id: str, folder: Path) -> LoadedModel:
    """Export a MONAI 3-D UNet (random weights, fixed seed) with its 3-D manifest into
    ``folder/<id>`` (tests/outputs/seg3d_models.py) and load it."""
    from node.inference.registry import load_model
    from tests.outputs.seg3d_models import monai_unet_3d

    channels, roi, size = REAL3D[model_id]
    out, _ = monai_unet_3d(
        folder / model_id,
        channels=channels,
        roi=roi,
        size=size,
        model_id=model_id,
        batch_size=2,
        overlap=0.25,
    )
    return load_model(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="source images per model")
    parser.add_argument("--repeat", type=int, default=3, help="best of N passes")
    parser.add_argument("--provider", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--max-batch", type=int, default=16, help="RuntimeConfig.max_batch (node default 16)")
    parser.add_argument(
        "--real",
        action="store_true",
        help="also real-size ResNet-50 and DenseNet-121 at 224x224 (needs torch)",
    )
    parser.add_argument(
        "--real3d", action="store_true", help="also a 3-D MONAI UNet segmentation model (needs torch, monai)"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="prepare in this process (limits.decode_memory_mib: 0), not in the node's preparation processes",
    )
    parser.add_argument(
        "--cpu-prepare",
        action="store_true",
        help="on CUDA, prepare in the preparation processes (models.gpu_preparation: false)",
    )
    parser.add_argument(
        "--processes", type=int, default=None, help="preparation processes (default: as the node, per core)"
    )
    parser.add_argument(
        "--niceness",
        type=int,
        default=LimitsSettings().prepare_niceness,
        help="the preparation processes' niceness (default: limits.prepare_niceness; 0: as the bench)",
    )
    args = parser.parse_args()

    providers = [CPU]
    cuda_ok = missing_cuda_library() is None and CUDA in ort.get_available_providers()
    if args.provider in ("cuda", "all") and cuda_ok:
        providers.append(CUDA)
    if args.provider == "cuda":
        providers = [CUDA] if cuda_ok else []
        if not providers:
            sys.exit("CUDA provider not usable here")

    registry = load_registry(REPO / "models" / "onnx")
    ids = args.models or (
        sorted(registry.models) + (list(REAL) if args.real else []) + (list(REAL3D) if args.real3d else [])
    )
    print(f"machine: {machine()}")
    header = (
        f"{'model':<20}{'provider':<10}{'images':>7}{'runs':>6}{'batch':>7}"
        f"{'node img/s':>12}{'bare img/s':>12}{'node ÷ bare':>13}{'prep ms/img':>13}"
    )
    size = args.processes or max(3, os.cpu_count() or 1)  # the node's default with runner.workers 2
    pool = None if args.in_process else PreparePool(size, 4096, 600, niceness=args.niceness)
    where = "in this process" if pool is None else f"{size} processes at nice {args.niceness}"
    print(f"preparation: {where}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="bench-inf-") as tmp:
        for model_id in ids:
            if model_id in REAL:
                model = build_real(model_id, Path(tmp))
                kind = "cxr"
            elif model_id in REAL3D:
                model = build_real3d(model_id, Path(tmp))
                kind = "ct"
            else:
                model = registry.get(model_id)
                kind = KIND[model_id]
            files = study_files(kind, Path(tmp) / f"{model_id}-study", args.images)
            for provider in providers:
                row = measure(model, files, provider, args.max_batch, args.repeat, pool, not args.cpu_prepare)
                print(row, flush=True)
    if pool is not None:
        pool.close()


if __name__ == "__main__":
    main()
