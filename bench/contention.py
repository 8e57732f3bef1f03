"""Where the node's CPU inference time goes when the preparation and the model share the cores.

Builds the real-size ResNet-50 of ``bench/inference.py --real`` (random weights, into a temporary
folder) and ``--images`` full-size chest radiograph phantoms, then prints three measurements:

1. onnxruntime alone: one batch of ``max_batch`` images, wall and CPU time of the bench process;
   then the same batches beside one process that prepares the phantoms nonstop (the node's
   ``PrepareSpec.prepare``, display kept, as an image-level model's children do) at normal
   priority and at nice 19. The ratio of onnxruntime's CPU beside it to alone is what the
   contention costs the model.
2. The node's phases one after the other: the preparation pool alone (``prepare_all``, sized as
   the node sizes it), the model alone over the prepared tensors, and ``prepare_and_infer``
   (both overlapped, as the node runs a job): node ÷ (preparation + model).
3. What one preparation process and the parent pay per image (CPU time read from /proc), against
   the same preparation in this process.

    .venv/bin/python bench/contention.py [--images 32]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.inference import best, build_real, machine, study_files  # noqa: E402
from node.inference.isolate import PreparePool, cpu_seconds  # noqa: E402
from node.inference.prepared import PrepareSpec  # noqa: E402
from node.inference.registry import LoadedModel  # noqa: E402
from node.inference.runtime import RuntimeConfig, create_session  # noqa: E402
from node.runner.analyse import prepare_all, prepare_and_infer  # noqa: E402
from node.settings import LimitsSettings  # noqa: E402


def _cpu_of(pid: int) -> float:
    return cpu_seconds(pid) or 0.0


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _hog(model_dir: str, files: list[str], niceness: int, stop: object, count: object) -> None:
    """Prepare ``files`` round and round until ``stop`` is set; the images prepared go to ``count``."""
    import cv2

    from node.inference.registry import load_model

    cv2.setNumThreads(1)
    os.nice(niceness)
    spec = PrepareSpec(load_model(Path(model_dir)).manifest, keep_display=True)
    n = 0
    while not stop.is_set():  # type: ignore[attr-defined]
        spec.prepare(files[n % len(files)], 0)
        n += 1
        count.value = n  # type: ignore[attr-defined]


def contention(model: LoadedModel, files: list[Path], max_batch: int, repeat: int) -> None:
    session = create_session(model, RuntimeConfig(max_batch=max_batch))
    batch = np.random.default_rng(0).standard_normal((max_batch, 3, 224, 224), dtype=np.float32)
    session.run(batch)

    def runs() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), _self_cpu()
        for _ in range(repeat):
            session.run(batch)
        return (time.perf_counter() - wall) / repeat, (_self_cpu() - cpu) / repeat

    wall, cpu = runs()
    print(f"onnxruntime alone: {wall * 1000:.0f} ms wall, {cpu * 1000:.0f} CPU-ms per batch of {max_batch}")
    ctx = mp.get_context("spawn")
    for niceness in (0, 19):
        stop, count = ctx.Event(), ctx.Value("i", 0)
        args = (str(model.directory), [str(f) for f in files], niceness, stop, count)
        hog = ctx.Process(target=_hog, args=args)
        hog.start()
        time.sleep(3.0)  # started and warm
        start = count.value
        w, c = runs()
        done = count.value - start
        stop.set()
        hog.join()
        print(
            f"beside a preparing process (nice {niceness}): {w * 1000:.0f} ms wall, {c * 1000:.0f} CPU-ms "
            f"per batch (onnxruntime's CPU x{c / cpu:.2f}); "
            f"it prepared {done} images meanwhile ({done / (w * repeat):.0f}/s)"
        )


def phases(model: LoadedModel, files: list[Path], max_batch: int, repeat: int) -> None:
    size = max(3, os.cpu_count() or 1)  # the node's default with runner.workers 2
    niceness = LimitsSettings().prepare_niceness  # as the node
    pool = PreparePool(size, 4096, 600, niceness=niceness)
    session = create_session(model, RuntimeConfig(max_batch=max_batch))
    manifest = model.manifest

    try:
        prepare_and_infer(files, manifest, session, False, preparer=pool)  # warm: processes, page cache
        prep = best(lambda: prepare_all(files, manifest, False, preparer=pool), repeat)
        images = prepare_all(files, manifest, False, preparer=pool)
        batch = np.concatenate([im.model_input.tensor for im in images])
        infer = best(lambda: session.run(batch), repeat)
        both = best(lambda: prepare_and_infer(files, manifest, session, False, preparer=pool), repeat)
        print(
            f"phases ({len(files)} images, {size} preparation processes): preparation {prep * 1000:.0f} ms, "
            f"model {infer * 1000:.0f} ms, sum {(prep + infer) * 1000:.0f} ms; "
            f"node path {both * 1000:.0f} ms "
            f"(node ÷ sum {(prep + infer) / both:.2f}; node ÷ bare model {infer / both:.2f})"
        )
        for processes in (1, size):
            one = PreparePool(processes, 4096, 600, niceness=niceness)
            try:
                prepare_all(files, manifest, False, preparer=one)  # warm
                kids = [c.pid for c in one._children]  # noqa: SLF001 - the bench reads the children's CPU
                k0, p0, t = sum(_cpu_of(p) for p in kids), _self_cpu(), time.perf_counter()
                prepare_all(files, manifest, False, preparer=one)
                wall = time.perf_counter() - t
                k1, p1 = sum(_cpu_of(p) for p in kids), _self_cpu()
            finally:
                one.close()
            n = len(files)
            print(
                f"  {processes} preparation process(es): {wall * 1000 / n:.1f} ms wall per image; "
                f"children {(k1 - k0) * 1000 / n:.1f} CPU-ms, "
                f"parent {(p1 - p0) * 1000 / n:.1f} CPU-ms per image"
            )
    finally:
        pool.close()
    t = _self_cpu()
    prepare_all(files, manifest, False)
    print(f"  in this process: {(_self_cpu() - t) * 1000 / len(files):.1f} CPU-ms per image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-contention-") as tmp:
        model = build_real("resnet50-224", Path(tmp))
        files = study_files("cxr", Path(tmp) / "study", args.images)
        contention(model, files, args.max_batch, args.repeat * 2)
        phases(model, files, args.max_batch, args.repeat)


if __name__ == "__main__":
    main()
