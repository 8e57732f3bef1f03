"""Error texts without patient data: pydicom (and Python's own conversions) quote the offending
value in their exception messages (``Unable to convert '1911-09-27' to 'DA' object``), so a job
error, a log line or a page would carry a birth date or a name. ``redact`` replaces such quoted
values by the attribute keyword (or ``<value>``), escapes control characters (no forged log lines)
and bounds the length.
"""

from __future__ import annotations

import logging
import re

_Q = r"(?P<q>['\"])(?P<v>.*?)(?P=q)"
# each pattern's quoted value group is replaced; the rest of the message is kept
_PATTERNS = (
    re.compile(r"(Unable to convert (?:non-conformant value )?)" + _Q + r"(?= to )", re.S),
    re.compile(r"(Invalid value for VR \w+: )" + _Q, re.S),
    re.compile(r"(could not convert string to float: )" + _Q, re.S),
    re.compile(r"(invalid literal for int\(\) with base \d+: )" + _Q, re.S),
    re.compile(r"(The value )" + _Q + r"(?= (?:is|for|exceeds|must))", re.S),
    re.compile(r"(value )" + _Q + r"(?= is not (?:valid|a valid|conformant))", re.S),
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")
MAX_CHARS = 1000


def redact(text: str, keyword: str | None = None, max_chars: int = MAX_CHARS) -> str:
    """``text`` with the values pydicom and Python quote in conversion errors replaced by
    ``<keyword>`` (``<value>`` when the attribute is not known), control characters escaped
    (``\\x1b``), line breaks as ``\\n``, and at most ``max_chars`` characters (``…`` marks a cut)."""
    label = f"<{keyword}>" if keyword else "<value>"
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: f"{m.group(1)}{label}", text)
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def error_text(exc: BaseException, keyword: str | None = None, max_chars: int = MAX_CHARS) -> str:
    """``TypeName: message`` of an exception, redacted (see :func:`redact`)."""
    return redact(f"{type(exc).__name__}: {exc}", keyword, max_chars)


#: Loggers of libraries that quote data values in their messages (pydicom's "Invalid value for VR
#: DA: '1911-09-27'", also raised as a warning, which ``logging.captureWarnings`` logs to
#: py.warnings).
LIBRARY_LOGGERS = ("pydicom", "highdicom", "py.warnings")


class RedactingFilter(logging.Filter):
    """Redacts (see :func:`redact`) each record's message in place, before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keeps the record; replaces its message when redaction changes it."""
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def redact_library_logs() -> None:
    """Put a :class:`RedactingFilter` on the loggers of :data:`LIBRARY_LOGGERS` (once each), so no
    handler (console, file, syslog) gets a value such a library quoted from a data set."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
