"""Preparation benchmark: CPU time per image of reading, decoding and preparing full-size chest
radiograph phantoms, as a preparation process does it (glibc's malloc tuned as in the node's
children, OpenCV on one thread), for this tree and, with ``--before DIR``, another tree (a copy
of an earlier commit) in the same run, alternating.

Phantoms: ``--images`` CXR studies of ``node.synth`` (2140x1760, 12 bits in 16, uncompressed,
7.5 MB each), prepared for the bundled ``cxr`` model's manifest (header window, invert
MONOCHROME1, area resize, normalise). Three figures per tree, each the median over ``--repeat``
passes of the per-image CPU time (``time.process_time``):

- **read + decode**: ``read_dataset`` (as the preparation reads a file), ``iter_frames`` and the
  frame's min/max pass (``stored_range``), which every later step shares;
- **to the tensor**: ``PrepareSpec.prepare`` without the display (a series-level model);
- **with the display**: ``PrepareSpec.prepare`` keeping the uint8 display (an image-level model
  with heatmap outputs).

    .venv/bin/python bench/prepare.py [--images 32] [--repeat 5] [--before /tmp/before] [--rounds 2]
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("read + decode", "to the tensor", "with the display")


def worker(tree: Path, folder: Path, repeat: int) -> dict[str, float]:
    """The three medians (CPU-ms per image) for the code of ``tree``, in this process."""
    sys.path.insert(0, str(tree))
    import cv2

    from node.inference import decode as dec
    from node.inference.isolate import _tune_malloc
    from node.inference.prepared import PrepareSpec
    from node.inference.registry import load_registry

    _tune_malloc()
    cv2.setNumThreads(1)
    manifest = load_registry(tree / "models" / "onnx").get("cxr").manifest
    files = sorted(folder.rglob("*.dcm"))
    mapped = "map_pixels" in inspect.signature(dec.read_dataset).parameters

    def read(path: Path) -> None:
        ds = dec.read_dataset(path, map_pixels=True) if mapped else dec.read_dataset(path)
        for frame in dec.iter_frames(ds):
            dec.stored_range(frame.pixels[0])
        dec.forget_stored_range()

    tensor, shown = PrepareSpec(manifest, keep_display=False), PrepareSpec(manifest, keep_display=True)
    out = {}
    for name, fn in (
        ("read + decode", read),
        ("to the tensor", lambda p: tensor.prepare(p, 0)),
        ("with the display", lambda p: shown.prepare(p, 0)),
    ):
        for path in files:  # warm: page cache, malloc's heap
            fn(path)
        times = []
        for _ in range(repeat):
            for path in files:
                start = time.process_time()
                fn(path)
                times.append(time.process_time() - start)
        out[name] = statistics.median(times) * 1000
    return out


def main() -> None:
    run_bench(__file__, __doc__, worker, COLUMNS, images=32, repeat=5, what="")


def run_bench(
    script: str,
    doc: str | None,
    work: Callable[[Path, Path, int], dict[str, float]],
    columns: Sequence[str],
    *,
    images: int,
    repeat: int,
    what: str,
) -> None:
    """The command line of a tree-beside-tree CPU bench: ``work(tree, folder, repeat)`` in a
    worker process per tree and round (``--worker``), over ``--images`` CXR phantoms."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the trees")
    parser.add_argument("--before", type=Path, default=None, help="another tree to run beside this one")
    parser.add_argument("--worker", nargs=2, metavar=("TREE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(work(Path(args.worker[0]), Path(args.worker[1]), args.repeat)))
        return
    sys.path.insert(0, str(REPO))
    from bench.inference import machine, study_files

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        study_files("cxr", Path(tmp), args.images)
        print(f"CPU-ms per image (median), {args.images} radiographs 2140x1760{what}, {args.repeat} passes")
        alternate(script, REPO, args.before, Path(tmp), args.repeat, args.rounds, columns)


def alternate(
    script: str,
    tree: Path,
    before: Path | None,
    folder: Path,
    repeat: int,
    rounds: int,
    columns: Sequence[str],
) -> None:
    """Run ``script --worker TREE FOLDER`` for ``tree`` and ``before`` (when given) in turn,
    ``rounds`` times, each in a fresh process, and print a row of its ``columns`` per run."""
    trees = [("this tree", tree)] + ([("before", before.resolve())] if before else [])
    header = f"{'tree':<12}{'round':>6}" + "".join(f"{name:>19}" for name in columns)
    print(header)
    print("-" * len(header))
    for round_ in range(1, rounds + 1):
        for name, path in trees:
            command = [sys.executable, script, "--repeat", str(repeat), "--worker", str(path), str(folder)]
            got = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            print(f"{name:<12}{round_:>6}" + "".join(f"{got[c]:>19.2f}" for c in columns), flush=True)


if __name__ == "__main__":
    main()
