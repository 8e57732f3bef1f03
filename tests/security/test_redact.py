"""Error texts lose the patient data pydicom quotes in them (issue 21, item 6)."""

from __future__ import annotations

import pydicom
import pytest

from node.redact import error_text, redact


def _raised(call) -> BaseException:  # noqa: ANN001
    with pytest.raises(Exception) as info:
        call()
    return info.value


def test_pydicom_date_conversion_error_loses_the_birth_date() -> None:
    exc = _raised(lambda: pydicom.valuerep.DA("1911-09-27"))
    assert "1911-09-27" in str(exc), "pydicom's own text quotes the value (what this guards against)"
    text = error_text(exc, "PatientBirthDate")
    assert "1911" not in text and "<PatientBirthDate>" in text and "'DA'" in text


@pytest.mark.parametrize(
    "message",
    [
        "Unable to convert non-conformant value 'DOE^JANE' to 'DT' object",
        "Invalid value for VR PN: 'DOE^JANE'.",
        "could not convert string to float: 'DOE^JANE'",
        "invalid literal for int() with base 10: 'DOE^JANE'",
    ],
)
def test_quoted_values_are_replaced(message: str) -> None:
    assert "DOE" not in redact(message, "PatientName")
    assert "<PatientName>" in redact(message, "PatientName")
    assert "<value>" in redact(message)


def test_control_characters_and_length_are_bounded() -> None:
    forged = "bad AE\r\n2026-01-01 00:00:00 INFO forged line\x1b[2J"
    text = redact(forged)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text and "\\x1b" in text
    assert len(redact("1." * 40000)) == 1000


def test_a_job_error_loses_the_birth_date() -> None:
    """The text recorded on a failed job (shown by the API, the pages and the log) is redacted
    too: a job that failed on pydicom's conversion of an invalid PatientBirthDate does not carry
    the date."""
    from node.runner import describe_error

    exc = _raised(lambda: pydicom.valuerep.DA("1911-09-27"))
    text = describe_error(exc)
    assert "1911" not in text, text
    assert "<value>" in text and "'DA'" in text, text
