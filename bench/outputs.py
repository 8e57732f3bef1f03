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

import statistics
import sys
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
    sys.path.insert(0, str(REPO))
    from bench.prepare import run_bench

    run_bench(__file__, __doc__, worker, COLUMNS, images=16, repeat=3, what=", cxr")


if __name__ == "__main__":
    main()
