"""Time to result: from the last instance's C-STORE response to the SR at the destination.

For each modality a phantom study (node.synth) is sent with DCMTK `storescu` (one association) to
the node, run as a subprocess with the reference models; its destination is a DCMTK `storescp`
writing into a folder. The clock starts when storescu exits (its last C-STORE response received,
plus an A-RELEASE) and stops when the SR file at storescp is complete and readable (the folder is
polled every 10 ms). The configured quiet period (series_quiet_s, group_by series) is subtracted.
The breakdown comes from the node's database: assembly wait beyond the quiet period (including
the assembler's poll interval), the job's recorded stage timings (queued, preprocessing, inferring,
writing), and sending (job finished → the SR's outbox row marked sent). Unless --cold, another
study of the same modality goes first and is waited for, so that the figure is the node's steady
state, not its first study after a start (one-time costs: imports, first-use caches, ORT warm-up).

    .venv/bin/python bench/time_to_result.py [--ct-slices 300] [--quiet 1.0]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from node.synth import generate_study  # noqa: E402
from node.types import JobTimings  # noqa: E402
from tests.helpers import analysing_config, free_port, wait_port  # noqa: E402

SR_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.88.22",
}


def ts(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def wait_sr(folder: Path, seen: set[str], timeout: float) -> tuple[float, str]:
    """Poll storescp's folder until a complete SR appears; (time.time(), SOP Instance UID)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in folder.iterdir():
            if path.name in seen:
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                str(ds.SOPInstanceUID)
            except Exception:  # still being written: retry at the next poll
                continue
            seen.add(path.name)
            if str(ds.SOPClassUID) in SR_CLASSES:
                return time.time(), str(ds.SOPInstanceUID)
        time.sleep(0.01)
    raise TimeoutError("no SR at the destination")


def breakdown(db: Path, study_uid: str, sr_uid: str, deadline: float) -> dict[str, float]:
    """Per-stage seconds of the study's job, once the SR's outbox row is marked sent."""
    while True:
        con = sqlite3.connect(db, timeout=10)
        try:
            job = con.execute(
                "select id, timings, created_at, finished_at, model_id from job where study_uid=?",
                (study_uid,),
            ).fetchone()
            sent = con.execute(
                "select sent_at from outboxitem where sop_instance_uid=?", (sr_uid,)
            ).fetchone()
            series_rx = con.execute(
                "select max(last_received_at) from series where study_uid=?", (study_uid,)
            ).fetchone()
        finally:
            con.close()
        if job and sent and sent[0]:
            break
        if time.monotonic() > deadline:
            raise TimeoutError("job/outbox rows not final")
        time.sleep(0.1)
    timings = JobTimings.model_validate_json(job[1] or "{}").root
    created, finished = ts(job[2]), ts(job[3])
    out = {"model": job[4], "assembly": created - ts(series_rx[0])}
    out.update({k: float(v) for k, v in timings.items()})
    del finished  # the job's finished_at moves on when its outbox drains; sending is the remainder
    return out


def send_and_wait(
    port: int, study: Path, received: Path, seen: set[str]
) -> tuple[str, float, float, float, str]:
    """storescu the study; (study UID, send start, last response, SR at destination, SR UID)."""
    files = sorted(study.glob("*.dcm"))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    t_send = time.time()
    proc = subprocess.run(
        ["storescu", "-aec", "PACSNODE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    t_last = time.time()
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.decode()[-500:])
    t_sr, sr_uid = wait_sr(received, seen, 600)
    return study_uid, t_send, t_last, t_sr, sr_uid


def run_one(kind: str, study: Path, quiet: float, tmp: Path, warmup: Path | None = None) -> dict:
    dest_port = free_port()
    received = tmp / f"rx-{kind}"
    received.mkdir()
    storescp = subprocess.Popen(
        ["storescp", "--aetitle", "DEST", "-od", str(received), str(dest_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    wait_port(dest_port)
    folder = tmp / f"node-{kind}"
    folder.mkdir()
    config = analysing_config(
        folder,
        dest_port,
        assembly={"series_quiet_s": quiet, "study_quiet_s": quiet, "poll_interval_s": 0.1},
        logging={"level": "WARNING"},
    )
    import yaml

    port = yaml.safe_load(config.read_text())["dicom"]["port"]
    log = (folder / "node.log").open("wb")
    node = subprocess.Popen(
        [sys.executable, "-m", "node", "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_port(port, 120)
        seen: set[str] = set()
        if warmup is not None:  # one study first, so that the measured one finds the node warm
            warm_uid, *_, warm_sr = send_and_wait(port, warmup, received, seen)
            breakdown(folder / "data" / "node.db", warm_uid, warm_sr, time.monotonic() + 60)
        study_uid, t_send, t_last, t_sr, sr_uid = send_and_wait(port, study, received, seen)
        stages = breakdown(folder / "data" / "node.db", study_uid, sr_uid, time.monotonic() + 60)
    finally:
        node.terminate()
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
        storescp.terminate()
        storescp.wait(10)
    return {
        "kind": kind,
        "images": len(list(study.glob("*.dcm"))),
        "mb": sum(f.stat().st_size for f in study.glob("*.dcm")) / 1e6,
        "send": t_last - t_send,
        "ttr": t_sr - t_last - quiet,
        **stages,
    }


def fill_sending(row: dict, quiet: float) -> None:
    """sending (and anything unaccounted): time to result minus the recorded stages."""
    recorded = ("queued", "preprocessing", "inferring", "writing")
    known = row["assembly"] - quiet + sum(row.get(s, 0.0) for s in recorded)
    row["sending"] = row["ttr"] - known


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct-slices", type=int, default=300)
    parser.add_argument("--quiet", type=float, default=1.0, help="series_quiet_s (subtracted)")
    parser.add_argument("--kinds", nargs="*", default=["cxr", "mammo", "mr", "ct"])
    parser.add_argument(
        "--cold", action="store_true", help="measure the first study after the node starts (no warm-up study)"
    )
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install dcmtk")
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; {time.strftime('%Y-%m-%d')}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ttr-") as tmp_s:
        tmp = Path(tmp_s)
        for kind in args.kinds:
            options = {"slices": args.ct_slices} if kind == "ct" else {}
            t0 = time.perf_counter()
            generate_study(kind, tmp / f"study-{kind}", 7, None, write_masks=False, **options)
            gen = time.perf_counter() - t0
            warmup = None
            if not args.cold:
                warmup = tmp / f"warmup-{kind}"
                generate_study(kind, warmup, 8, None, write_masks=False, **options)
            row = run_one(kind, tmp / f"study-{kind}", args.quiet, tmp, warmup)
            row["gen"] = gen
            fill_sending(row, args.quiet)
            rows.append(row)
            print(f"  {kind}: generated in {gen:.1f} s, sent in {row['send']:.1f} s", flush=True)
    stages = ["assembly", "queued", "preprocessing", "inferring", "writing", "sending"]
    header = f"{'modality':<9}{'model':<10}{'images':>7}{'MB':>7}{'send s':>8}{'result s':>10}  " + "".join(
        f"{s[:10]:>11}" for s in stages
    )
    print(f"time to result (s, last C-STORE response → SR at storescp, minus quiet {args.quiet:g} s)")
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = "".join(f"{r.get(s, 0.0) - (args.quiet if s == 'assembly' else 0.0):>11.2f}" for s in stages)
        print(
            f"{r['kind']:<9}{r['model']:<10}{r['images']:>7}{r['mb']:>7.1f}"
            f"{r['send']:>8.2f}{r['ttr']:>10.2f}  {cells}"
        )
    print(
        "(assembly = job created − last instance received − quiet period;"
        " sending = the rest: outbox → storescp)"
    )


if __name__ == "__main__":
    main()
