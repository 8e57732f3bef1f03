"""External validators: dicom3tools' dciodvfy, DCMTK's dsrdump, PixelMed's DicomSRValidator.

A missing tool skips the test on a workstation and fails it in CI (``CI`` set), through
:func:`tests.helpers.need`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import need

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
#: The JDK XPath limits that PixelMed's rule sets exceed (as in shared/tools/sr-validate).
JAVA_FLAGS = (
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
)
BATCH_SOURCE = Path(__file__).with_name("SrValidateMany.java")


@dataclass(frozen=True)
class Report:
    """A validator's findings on one file."""

    errors: list[str]
    warnings: list[str]
    text: str


def _report(text: str) -> Report:
    lines = text.splitlines()
    return Report(
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
        text=text,
    )


def dciodvfy(path: Path) -> Report:
    """dciodvfy's report on one file."""
    tool = need("dciodvfy")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return _report(proc.stdout + proc.stderr)


def dsrdump(path: Path) -> subprocess.CompletedProcess[str]:
    """dsrdump of one SR (the tree on stdout, complaints on stderr)."""
    tool = need("dsrdump")
    return subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)


def pixelmed_available() -> bool:
    """True when java and PixelMed's jar are installed."""
    return PIXELMED_JAR.exists() and shutil.which("java") is not None


def need_pixelmed() -> None:
    """Skip (fail in CI) unless java and PixelMed are installed."""
    need("java")
    if not PIXELMED_JAR.exists():
        message = f"{PIXELMED_JAR} is not installed (apt-get install pixelmed-apps)"
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs it")
        pytest.skip(message)


class SrValidation:
    """PixelMed's DicomSRValidator over several SRs in one JVM, started in the background so that
    it overlaps with the other tests (one JVM per file costs 10+ s each on a small machine)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = [str(p) for p in paths]
        self._proc = subprocess.Popen(
            ["java", *JAVA_FLAGS, "-cp", str(PIXELMED_JAR), str(BATCH_SOURCE), *self.paths],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reports: dict[str, Report] | None = None

    def reports(self) -> dict[str, Report]:
        """The report of each file, by path (waits for the validator)."""
        if self._reports is None:
            output, _ = self._proc.communicate(timeout=600)
            sections: dict[str, list[str]] = {}
            current: list[str] | None = None
            for line in output.splitlines():
                if line.startswith("=== ") and line[4:] in self.paths:
                    current = sections.setdefault(line[4:], [])
                elif current is not None:
                    current.append(line)
            if self._proc.returncode != 0 or set(sections) != set(self.paths):
                raise AssertionError(f"PixelMed validator failed (status {self._proc.returncode}):\n{output}")
            self._reports = {path: _report("\n".join(lines)) for path, lines in sections.items()}
        return self._reports

    def close(self) -> None:
        """Stop the validator if it still runs."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
