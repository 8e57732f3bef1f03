"""The CLI end to end: serve in a subprocess, echo and send to it, --version."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import yaml

from node import __version__
from tests.helpers import make_series, start_node_process, wait_port, write_config


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=120)


def test_version():
    result = _cli("--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_serve_echo_send_and_page(tmp_path):
    config = write_config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    port, web_port = cfg["dicom"]["port"], cfg["web"]["port"]
    proc = start_node_process(config, tmp_path / "node.log")
    try:
        echo = _cli("echo", "127.0.0.1", str(port), "--aec", "PACSNODE")
        assert echo.returncode == 0, echo.stderr
        assert "Success" in echo.stdout
        files = make_series(tmp_path / "in", 4)
        sent = _cli(
            "send", str(tmp_path / "in"), "--host", "127.0.0.1", "--port", str(port), "--aec", "PACSNODE"
        )
        assert sent.returncode == 0, sent.stderr
        assert "sent 4 of 4" in sent.stdout
        wait_port(web_port)
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/v1/studies") as rsp:
                body = json.load(rsp)
            if body["items"] and body["items"][0]["state"] == "complete" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert body["total"] == 1 and body["items"][0]["instance_count"] == len(files)
        assert body["items"][0]["state"] == "complete"
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/readyz") as rsp:
            assert json.load(rsp)["status"] == "ready"
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0  # clean shutdown on SIGTERM
    log = (tmp_path / "node.log").read_text()
    assert "listening" in log


def test_echo_to_nothing_fails_cleanly():
    from tests.helpers import free_port

    result = _cli("echo", "127.0.0.1", str(free_port()))
    assert result.returncode == 1
    assert "echo failed" in result.stderr


def test_send_reports_failures(tmp_path):
    (tmp_path / "notdicom.txt").write_text("hello")
    result = _cli("send", str(tmp_path), "--port", "1")
    assert result.returncode == 1
    assert "no DICOM files" in result.stderr


def test_the_converters_are_installed_with_the_node(tmp_path):
    """``converters`` is a package of the distribution (pyproject), importable from anywhere, not
    put on sys.path by the CLI: ``pacs-node convert`` works outside the checkout."""
    found = subprocess.run(
        [sys.executable, "-c", "import converters.cli, sys; print('converters' in sys.modules)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert found.returncode == 0 and found.stdout.strip() == "True", found.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "node", "convert", "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert shown.returncode == 0 and "MONAI bundle" in shown.stdout, shown.stderr
