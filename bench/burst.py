"""Burst and memory: many small studies from four concurrent `storescu` clients at once.

N one-instance studies (pydicom's CT_small.dcm, ~40 kB, each with fresh study/series/SOP UIDs) are
split over 4 storescu processes (one association each, as fast as they go) sending to the node run
as a subprocess (fsync on; without --models no model is loaded: this measures ingest, assembly and
routing, which records each series as "not routed"). The node's RSS is sampled from /proc every
50 ms. Reported:
send time, time until every series has been assembled and routed, instances/s, the node's RSS at
start, at each quarter of the burst and at the end, and its peak; nothing may fail (every storescu
exits 0, every instance is in the database, every series reaches its final state).

With --models the reference models are loaded (CPU) and every study is analysed: CT_small routes
to ct-liver, each study gets a job, an SR and a heatmap capture, delivered to a DCMTK storescp
(+uf: every copy it is sent is kept, so duplicates would show); the clock then runs until every
job is done and every output delivered, and nothing may fail or arrive twice.

    .venv/bin/python bench/burst.py [--studies 1000] [--clients 4] [--models]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import free_port, fresh_copy, sample_file, wait_port, write_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rows(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(db, timeout=30)
    try:
        return list(con.execute(sql))
    finally:
        con.close()


def count(db: Path, sql: str) -> int:
    try:
        con = sqlite3.connect(db, timeout=5)
        try:
            return int(con.execute(sql).fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--models", action="store_true", help="load the models; analyse and deliver")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        sys.exit("storescu not found: apt-get install dcmtk")
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp_s:
        tmp = Path(tmp_s)
        src = sample_file("CT_small.dcm")
        files = [
            fresh_copy(src, tmp / "in" / f"{i:05d}.dcm", generate_uid(), generate_uid())
            for i in range(args.studies)
        ]
        analysed: dict = {}
        if args.models:
            dest_port = free_port()
            (tmp / "received").mkdir()
            receiver = subprocess.Popen(
                ["storescp", "+uf", "--aetitle", "DEST", "-od", str(tmp / "received"), str(dest_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_port(dest_port)
            analysed = {
                "models": {"directory": str(REPO / "models" / "onnx"), "providers": ["CPUExecutionProvider"]},
                "destinations": [
                    {"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}
                ],
                "outputs": {"send_to": "all"},
            }
        config = write_config(
            tmp,
            dicom={"max_associations": 16},
            assembly={"series_quiet_s": 1.0, "poll_interval_s": 0.2},
            web={"enabled": False},
            logging={"level": "WARNING"},
            **analysed,
        )
        import yaml

        port = yaml.safe_load(config.read_text())["dicom"]["port"]
        db = tmp / "data" / "node.db"
        env = {**os.environ, "TCP_NODELAY": "1"}
        node = subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "--config", str(config)],
            stdout=(tmp / "node.log").open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        samples: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    samples.append((time.perf_counter(), rss_mb(node.pid)))
                except OSError:
                    return
                time.sleep(0.05)

        try:
            wait_port(port, 60)
            time.sleep(0.5)
            rss_start = rss_mb(node.pid)
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            shares = [files[i :: args.clients] for i in range(args.clients)]
            t0 = time.perf_counter()
            procs = [
                subprocess.Popen(
                    ["storescu", "-aec", "PACSNODE", "127.0.0.1", str(port), *map(str, share)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env=env,
                )
                for share in shares
            ]
            quarters: list[tuple[int, float]] = []
            marks = [args.studies * q // 4 for q in (1, 2, 3)]
            while any(p.poll() is None for p in procs):
                n = count(db, "select count(*) from instance")
                while marks and n >= marks[0]:
                    quarters.append((marks.pop(0), rss_mb(node.pid)))
                time.sleep(0.1)
            send_s = time.perf_counter() - t0
            failed = [p.stderr.read().decode()[-300:] for p in procs if p.returncode != 0]
            stored = count(db, "select count(*) from instance")
            deadline = time.monotonic() + 300
            final = "('not routed', 'routed')"
            while time.monotonic() < deadline:
                done = count(db, f"select count(*) from series where state in {final}")
                if done >= args.studies:
                    break
                time.sleep(0.1)
            all_s = time.perf_counter() - t0
            if args.models:
                deadline = time.monotonic() + 3600
                while time.monotonic() < deadline:
                    jobs_done = count(db, "select count(*) from job where state in ('done', 'failed')")
                    unsent = count(db, "select count(*) from outboxitem where state != 'sent'")
                    if jobs_done >= args.studies and unsent == 0:
                        break
                    time.sleep(0.2)
                analysed_s = time.perf_counter() - t0
            time.sleep(1.0)
            rss_end = rss_mb(node.pid)
        finally:
            stop.set()
            node.terminate()
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
            if args.models:
                receiver.terminate()
                receiver.wait(10)
        peak = max(r for _, r in samples) if samples else 0.0
        print(
            f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; {time.strftime('%Y-%m-%d')}"
        )
        print(f"studies {args.studies} (1 instance each, ~40 kB), {args.clients} storescu clients at once")
        print(f"storescu failures: {len(failed)}{' ' + failed[0] if failed else ''}")
        print(f"instances stored: {stored}/{args.studies}; series assembled+routed: {done}/{args.studies}")
        print(
            f"send time: {send_s:.1f} s ({args.studies / send_s:.1f} inst/s); until all routed: {all_s:.1f} s"
        )
        if args.models:
            jobs = count(db, "select count(*) from job where state = 'done'")
            failed_jobs = count(db, "select count(*) from job where state = 'failed'")
            outputs = count(db, "select count(*) from outboxitem where state = 'sent'")
            arrived = Counter(
                str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                for f in (tmp / "received").iterdir()
            )
            delivered = sum(arrived.values())
            print(
                f"jobs done: {jobs}/{args.studies}, failed: {failed_jobs}; outputs sent {outputs}, "
                f"files at the destination {delivered} (equal: nothing twice)"
            )
            retried = rows(
                db, "select sop_instance_uid, attempts, last_error from outboxitem where attempts > 1"
            )
            twice = {uid: n for uid, n in arrived.items() if n > 1}
            if twice or retried:
                print(f"arrived more than once: {twice}; sent more than once: {retried}")
            print(f"until every study analysed and its outputs delivered: {analysed_s:.1f} s")
        marks_txt = ", ".join(f"after {n}: {r:.0f}" for n, r in quarters)
        print(f"node RSS MB: start {rss_start:.0f}; {marks_txt}; end {rss_end:.0f}; peak {peak:.0f}")


if __name__ == "__main__":
    main()
