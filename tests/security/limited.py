"""Run the node (or a snippet) in a subprocess under an address-space limit, so that a
decompression bomb that slipped through fails there with MemoryError instead of taking the test
machine (or CI) down."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from tests.helpers import wait_port

#: the node with the reference models on CPU starts in ~0.8 GiB of address space; analysing leaves room
NODE_LIMIT = 3 * 2**30


def _limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def _env() -> dict[str, str]:
    # one malloc arena per thread reserves 64 MiB of address space each: keep it to a few, so that
    # the limit measures what is allocated, not how many threads exist
    return {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "2"}


def start_limited_node(config: Path, log: Path, limit: int = NODE_LIMIT) -> subprocess.Popen:
    """`pacs-node serve` under RLIMIT_AS ``limit``; waits until its DICOM port listens."""
    port = yaml.safe_load(config.read_text())["dicom"]["port"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "serve", "--config", str(config)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        preexec_fn=_limit(limit),  # noqa: PLW1509 - no threads in the test process need it
        env=_env(),
    )
    try:
        wait_port(port, 60)
    except TimeoutError:
        proc.kill()
        raise
    return proc


def run_limited(code: str, limit: int = 2 * 2**30, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run Python ``code`` in a subprocess under RLIMIT_AS ``limit``."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_limit(limit),  # noqa: PLW1509
        env=_env(),
        cwd=Path(__file__).resolve().parents[2],
    )
