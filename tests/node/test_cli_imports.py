"""The command line loads only what a command needs (issue 19: `pacs-node echo` took 1.9 s loading
ONNX Runtime, FastAPI, OpenCV and highdicom it never used)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("onnxruntime", "fastapi", "cv2", "highdicom", "uvicorn", "sqlmodel")


def _loaded_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted(m for m in sys.modules if '.' not in m)))"
    command = [sys.executable, "-c", probe]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    return set(done.stdout.split())


def test_importing_the_cli_loads_no_stage() -> None:
    loaded = _loaded_after("import node.cli")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_the_synth_package_loads_a_renderer_on_first_use() -> None:
    loaded = _loaded_after("import node.synth")
    assert "cv2" not in loaded
    loaded = _loaded_after("from node.synth import render_ct")
    assert "cv2" in loaded
