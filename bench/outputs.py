"""Heatmap output benchmark: CPU time per image of what the node does after the model for an
image-level classifier with heatmaps, for this tree and, with ``--before DIR``, another tree (a
copy of an earlier commit) in the same run, alternating.

Phantoms: ``--images`` CXR studies of ``node.synth`` (2140x1760, 7.5 MB each) through the bundled
``cxr`` model (CAM heatmaps, two labels), in this process (glibc's malloc tuned as in the node,
OpenCV and onnxruntime on one thread). Per image, the median over ``--repeat`` passes of its CPU
time (``time.process_time``):

- **heatmaps**: ``explain.heatmaps`` for every label (the CAM mapped onto the source's pixels,
  normalised, its hotspot found), as ``analyse`` calls it;
- **outputs**: ``build_outputs`` with the default settings (the SR, one heatmap secondary capture
  per label, the other objects the defaults ask for);
- **job**: ``analyse`` and ``build_outputs`` together (decode, preparation and the model
  included), the whole of a job's CPU but for spooling and sending.

    .venv/bin/python bench/outputs.py [--images 16] [--repeat 3] [--before /tmp/before] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("heatmaps", "outputs", "job")


def worker(tree: Path, folder: Path, repeat: int) -> dict[str, float]:
    """The medians (CPU-ms per image) for the code of ``tree``, in this process."""
    sys.path.insert(0, str(tree))
    import importlib

    import cv2

    from node import runner
    from node.app import output_identity
    from node.inference.isolate import _tune_malloc
    from node.inference.registry import load_registry
    from node.inference.runtime import RuntimeConfig, create_session
    from node.settings import Settings

    an = importlib.import_module("node.runner.analyse")  # the module: node.runner exports a function so named
    _tune_malloc()
    cv2.setNumThreads(1)
    model = load_registry(tree / "models" / "onnx").get("cxr")
    session = create_session(model, RuntimeConfig(intra_op_threads=1, warmup=False))
    settings = Settings()
    identity = output_identity(settings)
    files = sorted(folder.rglob("*.dcm"))
    spent = {"heatmaps": 0.0}
    real = an.heatmaps

    def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the bench's own wrapper
        start = time.process_time()
        try:
            return real(*args, **kwargs)
        finally:
            spent["heatmaps"] += time.process_time() - start

    an.heatmaps = timed  # type: ignore[assignment]
    times: dict[str, list[float]] = {name: [] for name in COLUMNS}
    for rep in range(repeat + 1):  # the first pass warms the page cache, arenas and the session
        for path in files:
            spent["heatmaps"] = 0.0
            start = time.process_time()
            watch = an.Stopwatch(deadline=time.monotonic() + 600)
            result, sources = an.analyse(
                model, session, [path], level="series", uid_seed="bench", watch=watch
            )
            middle = time.process_time()
            runner.build_outputs(result, sources, identity, settings)
            end = time.process_time()
            if rep:
                times["heatmaps"].append(spent["heatmaps"])
                times["outputs"].append(end - middle)
                times["job"].append(end - start)
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the trees")
    parser.add_argument("--before", type=Path, default=None, help="another tree to run beside this one")
    parser.add_argument("--worker", nargs=2, metavar=("TREE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), Path(args.worker[1]), args.repeat)))
        return
    sys.path.insert(0, str(REPO))
    from bench.inference import machine, study_files
    from bench.prepare import alternate

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-outputs-") as tmp:
        study_files("cxr", Path(tmp), args.images)
        print(f"CPU-ms per image (median), {args.images} radiographs 2140x1760, cxr, {args.repeat} passes")
        alternate(__file__, REPO, args.before, Path(tmp), args.repeat, args.rounds, COLUMNS)


if __name__ == "__main__":
    main()
