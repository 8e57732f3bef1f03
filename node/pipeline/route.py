"""Routing: which model(s) a completed series (or study) goes to, decided by declarative rules.

The rules live in a YAML file (``config/routes.yaml``; schema in :mod:`node.pipeline.route_rules`).
Evaluation order:

1. ``exclude`` entries, top to bottom: the first that matches makes the object "not routed" and
   says why (derived images, localizers, non-image objects...).
2. ``rules``, top to bottom: **the first enabled rule that matches wins**; its models and grouping
   are the decision. Later rules are not evaluated.
3. Nothing matched: "not routed", with the reason in words (no rule for the modality, or each
   nearby rule's first failing condition). Not routed is a normal outcome, not an error.

Only the header values in :class:`RouteHeader` are read; never patient attributes. Pure code: no
database, no network.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID

from node.errors import ConfigError
from node.pipeline.region import (
    REGION_KEYWORDS,
    UNKNOWN_HEADER,
    RegionEvidence,
    header_region,
    needs_pixels,
    region_from_files,
)
from node.pipeline.route_rules import (
    HEADER_FIELDS,
    REGEX_FIELDS,
    Condition,
    Exclusion,
    Rule,
    RuleSet,
    load_rules,
    parse_rules,
)

__all__ = [
    "ROUTE_KEYWORDS",
    "Condition",
    "Exclusion",
    "RouteDecision",
    "RouteHeader",
    "Rule",
    "RuleSet",
    "UnreadableHeader",
    "check_models",
    "explain_files",
    "explain_report",
    "format_decision",
    "load_rules",
    "parse_rules",
    "read_route_dataset",
    "route",
    "route_header_from_dataset",
    "with_pixel_region",
]

log = logging.getLogger(__name__)

#: The only DICOM attributes routing reads (none identifies the patient).
ROUTE_KEYWORDS: tuple[str, ...] = (
    "Modality",
    "SOPClassUID",
    "BodyPartExamined",
    "ViewPosition",
    "ImageType",
    "ImageLaterality",
    "Laterality",
    "SeriesDescription",
    "ProtocolName",
    "StudyDescription",
    *(
        k
        for k in REGION_KEYWORDS
        if k not in ("Modality", "BodyPartExamined", "SeriesDescription", "ProtocolName", "StudyDescription")
    ),
)

_LABELS: dict[str, str] = {**HEADER_FIELDS, "laterality": "Laterality"}
_SHOWN_ITEMS = 6  # values listed in a reason before "..."
_SHOWN_PATTERN = 40  # characters of a regular expression shown in a reason
#: What pydicom raises on a malformed value or element (UnicodeError is a ValueError).
_VALUE_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    NotImplementedError,
    struct.error,
)


@dataclass(frozen=True)
class RouteHeader:
    """The header values routing looks at; None (or ``()``) when absent or empty."""

    modality: str | None = None
    sop_class_uid: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    image_type: tuple[str, ...] = ()
    laterality: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    study_description: str | None = None
    #: The codes of the top-level AnatomicRegionSequence, as (scheme, value, meaning).
    anatomic_codes: tuple[tuple[str, str, str], ...] = ()
    #: The body region the header names (BodyPartExamined, anatomy codes, descriptions).
    region: RegionEvidence = UNKNOWN_HEADER
    #: Looks at the pixels when the header names no region (set by :func:`with_pixel_region`);
    #: called at most once, and only when a rule's ``body_region`` condition is reached.
    pixel_region: Callable[[], RegionEvidence] | None = dc_field(default=None, compare=False, repr=False)

    def body_region(self) -> RegionEvidence:
        """The region evidence: the header's, else (CT/MR) the pixels', else unknown."""
        if self.region.known or self.pixel_region is None or not needs_pixels(self.modality, self.region):
            return self.region
        return self.pixel_region()

    def value(self, field: str) -> str | None:
        """A field as text (ImageType joined with backslashes); None when absent."""
        if field == "image_type":
            return "\\".join(self.image_type) or None
        if field == "anatomic_region":
            return ", ".join(f"{m or v} ({s} {v})" for s, v, m in self.anatomic_codes) or None
        return getattr(self, field)


@dataclass(frozen=True)
class RouteDecision:
    """Where a series goes (``rule``/``models``/``grouping``), or why it goes nowhere.

    ``reason`` is one line for people (stored on the series, shown on the page); ``trace`` has
    one line per exclusion and rule evaluated, in order.
    """

    rule: str | None
    models: tuple[str, ...]
    grouping: str | None
    reason: str
    trace: tuple[str, ...] = ()

    @property
    def routed(self) -> bool:
        """True when a rule matched (and so models were chosen)."""
        return self.rule is not None and bool(self.models)


# ------------------------------------------------------------------------------------------- header


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except _VALUE_ERRORS as exc:
        log.warning("routing: %s cannot be read (%s); treated as missing", keyword, type(exc).__name__)
        return None
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if isinstance(value, MultiValue | list | tuple):
        value = "\\".join(str(v).strip() for v in value)
    text = str(value).strip()
    return text or None


def _image_type(ds: Dataset) -> tuple[str, ...]:
    raw = _text(ds, "ImageType")
    if raw is None:
        return ()
    return tuple(part.strip() for part in raw.split("\\") if part.strip())


def _anatomic_codes(ds: Dataset) -> tuple[tuple[str, str, str], ...]:
    """(scheme, value, meaning) of each item of the top-level AnatomicRegionSequence."""
    try:
        items = list(ds.get("AnatomicRegionSequence") or [])
    except _VALUE_ERRORS as exc:
        log.warning(
            "routing: AnatomicRegionSequence cannot be read (%s); treated as missing", type(exc).__name__
        )
        return ()
    codes = []
    for item in items:
        if not isinstance(item, Dataset):
            continue
        value = _text(item, "CodeValue") or _text(item, "LongCodeValue") or _text(item, "URNCodeValue")
        if value:
            codes.append(
                ((_text(item, "CodingSchemeDesignator") or ""), value, _text(item, "CodeMeaning") or "")
            )
    return tuple(codes)


def route_header_from_dataset(ds: Dataset) -> RouteHeader:
    """The routing header of a dataset (pixel data not needed: read with ``stop_before_pixels``).

    Reads only :data:`ROUTE_KEYWORDS` (and the file meta's MediaStorageSOPClassUID when the
    dataset lacks SOPClassUID). Laterality is ImageLaterality, falling back to Laterality.
    """
    sop_class = _text(ds, "SOPClassUID")
    meta = getattr(ds, "file_meta", None)
    if sop_class is None and meta is not None:
        sop_class = _text(meta, "MediaStorageSOPClassUID")
    return RouteHeader(
        modality=_text(ds, "Modality"),
        sop_class_uid=sop_class,
        body_part=_text(ds, "BodyPartExamined"),
        view_position=_text(ds, "ViewPosition"),
        image_type=_image_type(ds),
        laterality=_text(ds, "ImageLaterality") or _text(ds, "Laterality"),
        series_description=_text(ds, "SeriesDescription"),
        protocol_name=_text(ds, "ProtocolName"),
        study_description=_text(ds, "StudyDescription"),
        anatomic_codes=_anatomic_codes(ds),
        region=header_region(ds),
    )


def with_pixel_region(header: RouteHeader, look: Callable[[], RegionEvidence]) -> RouteHeader:
    """``header`` with a pixel look-up for its body region, called at most once and only if needed."""
    return dataclasses.replace(header, pixel_region=functools.cache(look))


# --------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    text: str
    #: The header field that decided (used to tell "no rule for this modality").
    field: str | None = None


def _norm(value: str) -> str:
    return value.strip().casefold()


def _uid_text(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def _list_text(values: Sequence[str], field: str) -> str:
    shown = [UID(v).name if field == "sop_class_uid" else v for v in values[:_SHOWN_ITEMS]]
    more = ", ..." if len(values) > _SHOWN_ITEMS else ""
    return "[" + ", ".join(shown) + more + "]"


def _value_shown(field: str, value: str) -> str:
    return _uid_text(value) if field == "sop_class_uid" else value


def _check_values(field: str, expected: Sequence[str], header: RouteHeader) -> _Outcome:
    label = _LABELS[field]
    value = header.value(field)
    if value is None:
        return _Outcome(False, f"{label} missing, expected one of {_list_text(expected, field)}", field)
    wanted = {_norm(v) for v in expected}
    shown = _value_shown(field, value)
    if _norm(value) in wanted:
        if field == "sop_class_uid":  # the list of UIDs says little; the class's name says it
            return _Outcome(True, f"{label} is {UID(value).name}", field)
        return _Outcome(True, f"{label} {shown} in {_list_text(expected, field)}", field)
    return _Outcome(False, f"{label} {shown} not in {_list_text(expected, field)}", field)


def _check_image_type(required: Sequence[str], header: RouteHeader) -> _Outcome:
    needed = "\\".join(v.strip().upper() for v in required)
    if not header.image_type:
        return _Outcome(False, f"ImageType missing (needs {needed})", "image_type")
    have = {_norm(v) for v in header.image_type}
    shown = "\\".join(header.image_type)
    absent = [v.strip().upper() for v in required if _norm(v) not in have]
    if absent:
        lacking = "\\".join(absent)
        return _Outcome(False, f"ImageType {shown} does not contain {lacking}", "image_type")
    return _Outcome(True, f"ImageType {shown} contains {needed}", "image_type")


def _check_image_type_any(wanted: Sequence[str], header: RouteHeader) -> _Outcome:
    shown_wanted = _list_text([v.strip().upper() for v in wanted], "image_type")
    if not header.image_type:
        return _Outcome(False, f"ImageType missing (needs one of {shown_wanted})", "image_type")
    have = {_norm(v) for v in header.image_type}
    shown = "\\".join(header.image_type)
    found = [v.strip().upper() for v in wanted if _norm(v) in have]
    if found:
        return _Outcome(True, f"ImageType {shown} contains {found[0]}", "image_type")
    return _Outcome(False, f"ImageType {shown} contains none of {shown_wanted}", "image_type")


def _check_anatomic_region(expected: Sequence[str], header: RouteHeader) -> _Outcome:
    """Does an item of AnatomicRegionSequence carry one of ``expected`` (``SCHEME:VALUE`` or a
    bare value)?"""
    shown_expected = _list_text(list(expected), "anatomic_region")
    if not header.anatomic_codes:
        return _Outcome(
            False, f"AnatomicRegionSequence missing, expected one of {shown_expected}", "anatomic_region"
        )
    for scheme, value, meaning in header.anatomic_codes:
        for code in expected:
            want_scheme, _, want_value = code.rpartition(":")
            if _norm(want_value) == _norm(value) and (not want_scheme or _norm(want_scheme) == _norm(scheme)):
                return _Outcome(
                    True,
                    f"AnatomicRegionSequence has {meaning or value} ({scheme} {value})",
                    "anatomic_region",
                )
    return _Outcome(
        False,
        f"AnatomicRegionSequence {header.value('anatomic_region')} not in {shown_expected}",
        "anatomic_region",
    )


def _check_body_region(expected: Sequence[str], header: RouteHeader) -> _Outcome:
    evidence = header.body_region()
    if not evidence.known:
        return _Outcome(False, f"body region unknown ({evidence.text})", "body_region")
    regions = "+".join(evidence.regions)
    if any(r in expected for r in evidence.regions):
        return _Outcome(True, f"body region {regions} ({evidence.text})", "body_region")
    return _Outcome(
        False,
        f"body region {regions} ({evidence.text}) not in {_list_text(expected, 'body_region')}",
        "body_region",
    )


def _patterns_text(condition: Condition, field: str) -> str:
    shown = []
    for pattern in condition.patterns(field):
        text = pattern.pattern
        if len(text) > _SHOWN_PATTERN:
            text = text[:_SHOWN_PATTERN] + "..."
        shown.append(f"/{text}/")
    return " or ".join(shown)


def _search(condition: Condition, pattern_field: str, field: str, header: RouteHeader) -> _Outcome:
    """Does ``header.<field>`` match one of the expressions of ``condition.<pattern_field>``?"""
    label = _LABELS[field]
    value = header.value(field)
    if value is None:
        return _Outcome(False, f"{label} missing", field)
    for pattern in condition.patterns(pattern_field):
        found = pattern.search(value)
        if found:
            return _Outcome(True, f"{label} '{value}' matches '{found.group(0)}'", field)
    expected = _patterns_text(condition, pattern_field)
    return _Outcome(False, f"{label} '{value}' does not match {expected}", field)


def _check_any_description(condition: Condition, header: RouteHeader) -> _Outcome:
    for field in REGEX_FIELDS:
        outcome = _search(condition, "any_description", field, header)
        if outcome.ok:
            return outcome
    present = [f"{_LABELS[f]} '{header.value(f)}'" for f in REGEX_FIELDS if header.value(f) is not None]
    seen = ", ".join(present) if present else "no Series/Protocol/Study description"
    pats = _patterns_text(condition, "any_description")
    return _Outcome(False, f"no description matches {pats} ({seen})", "any_description")


def _checks(condition: Condition, header: RouteHeader) -> Iterator[_Outcome]:
    """The condition's checks, in a fixed order, evaluated lazily (the first failure stops)."""
    for field in ("modality", "sop_class_uid"):
        expected = getattr(condition, field)
        if expected is not None:
            yield _check_values(field, expected, header)
    if condition.missing is not None:
        for field in condition.missing:
            value = header.value(field)
            if value is not None:
                shown = _value_shown(field, value)
                yield _Outcome(False, f"{_LABELS[field]} is {shown} (used only when it is missing)", field)
        yield _Outcome(True, " and ".join(f"{_LABELS[f]} missing" for f in condition.missing))
    if condition.present is not None:
        for field in condition.present:
            if header.value(field) is None:
                yield _Outcome(False, f"{_LABELS[field]} missing", field)
        shown = " and ".join(f"{_LABELS[f]} {header.value(f)} present" for f in condition.present)
        yield _Outcome(True, shown)
    for field in ("body_part", "view_position", "laterality"):
        expected = getattr(condition, field)
        if expected is not None:
            yield _check_values(field, expected, header)
    if condition.image_type is not None:
        yield _check_image_type(condition.image_type, header)
    if condition.image_type_any is not None:
        yield _check_image_type_any(condition.image_type_any, header)
    if condition.anatomic_region is not None:
        yield _check_anatomic_region(condition.anatomic_region, header)
    for field in REGEX_FIELDS:
        if getattr(condition, field) is not None:
            yield _search(condition, field, field, header)
    if condition.any_description is not None:
        yield _check_any_description(condition, header)
    if condition.all_ is not None:
        yield _all(condition.all_, header)
    if condition.any_ is not None:
        yield _any(condition.any_, header)
    if condition.not_ is not None:
        inner = _evaluate(condition.not_, header)
        if inner.ok:
            yield _Outcome(False, f"{inner.text}, which rules it out", inner.field)
        else:
            yield _Outcome(True, inner.text, inner.field)
    if condition.body_region is not None:  # last: it may read the pixels
        yield _check_body_region(condition.body_region, header)


def _all(conditions: Iterable[Condition], header: RouteHeader) -> _Outcome:
    passed: list[str] = []
    for condition in conditions:
        outcome = _evaluate(condition, header)
        if not outcome.ok:
            return outcome
        passed.append(outcome.text)
    return _Outcome(True, " and ".join(passed))


def _any(conditions: Iterable[Condition], header: RouteHeader) -> _Outcome:
    failed: list[_Outcome] = []
    for condition in conditions:
        outcome = _evaluate(condition, header)
        if outcome.ok:
            return outcome
        failed.append(outcome)
    fields = {o.field for o in failed}
    common = fields.pop() if len(fields) == 1 else None
    return _Outcome(False, "none of: " + "; ".join(o.text for o in failed), common)


def _evaluate(condition: Condition, header: RouteHeader) -> _Outcome:
    """Every field of one condition object must hold: the first failure, or all the successes."""
    passed: list[str] = []
    for outcome in _checks(condition, header):
        if not outcome.ok:
            return outcome
        passed.append(outcome.text)
    return _Outcome(True, " and ".join(passed))


def _not_routed(header: RouteHeader, failures: list[tuple[str, _Outcome]], enabled: int) -> str:
    if enabled == 0:
        return "not routed: no routing rule is enabled"
    nearby = [(name, o) for name, o in failures if o.field != "modality"]
    unknown = [o for _, o in nearby if o.field == "body_region" and o.text.startswith("body region unknown")]
    if unknown:
        others = [(n, o) for n, o in nearby if o.field != "body_region"]
        rest = "; " + _not_routed(header, others, enabled).removeprefix("not routed: ") if others else ""
        return "not routed: " + unknown[0].text + rest
    if not nearby:
        if header.modality is None:
            return "not routed: no rule for objects without a Modality"
        return f"not routed: no rule for modality {header.modality}"
    grouped: dict[str, list[str]] = {}
    for name, outcome in nearby:
        grouped.setdefault(outcome.text, []).append(name)
    parts = []
    for text, names in grouped.items():
        quoted = ", ".join(f"'{n}'" for n in names)
        parts.append(f"{'rules' if len(names) > 1 else 'rule'} {quoted}: {text}")
    return "not routed: " + "; ".join(parts)


def route(rules: RuleSet, header: RouteHeader) -> RouteDecision:
    """Decide where an object (the first instance of a series) goes: exclusions first, then the
    first enabled rule that matches; otherwise "not routed" with the reason in words."""
    trace: list[str] = []
    for exclusion in rules.exclusions:
        if not exclusion.enabled:
            trace.append(f"exclude '{exclusion.name}': disabled")
            continue
        outcome = _evaluate(exclusion.match, header)
        if outcome.ok:
            trace.append(f"exclude '{exclusion.name}': matches ({outcome.text})")
            why = f" ({exclusion.description})" if exclusion.description else ""
            log.debug("routing: excluded by %s", exclusion.name)
            reason = f"not routed: excluded by '{exclusion.name}'{why}: {outcome.text}"
            return RouteDecision(None, (), None, reason, tuple(trace))
        trace.append(f"exclude '{exclusion.name}': no ({outcome.text})")
    failures: list[tuple[str, _Outcome]] = []
    enabled = 0
    for rule in rules.rules:
        if not rule.enabled:
            trace.append(f"rule '{rule.name}': disabled")
            continue
        enabled += 1
        outcome = _evaluate(rule.match, header)
        if outcome.ok:
            trace.append(f"rule '{rule.name}': matches ({outcome.text})")
            log.debug("routing: rule %s -> %s (%s)", rule.name, ", ".join(rule.models), rule.grouping)
            reason = f"rule '{rule.name}': {outcome.text}"
            return RouteDecision(rule.name, tuple(rule.models), rule.grouping, reason, tuple(trace))
        trace.append(f"rule '{rule.name}': no ({outcome.text})")
        failures.append((rule.name, outcome))
    log.debug("routing: no rule matched (modality %s)", header.modality)
    return RouteDecision(None, (), None, _not_routed(header, failures, enabled), tuple(trace))


# ----------------------------------------------------------------------------------- start-up check


def check_models(rules: RuleSet, known_model_ids: Iterable[str]) -> None:
    """Raise ConfigError naming every enabled rule that names a model id not in
    ``known_model_ids`` (disabled rules may name models not installed yet)."""
    known = set(known_model_ids)
    problems = []
    for index, rule in enumerate(rules.rules):
        if not rule.enabled:
            continue
        for position, model in enumerate(rule.models):
            if model not in known:
                problems.append(f"{rules.rule_label(index)}: models.{position}: unknown model id '{model}'")
    if problems:
        listed = ", ".join(sorted(known)) if known else "none loaded"
        raise ConfigError(f"{rules.source}: " + "; ".join(problems) + f" (known models: {listed})")


# ------------------------------------------------------------------------------------ rule tester


def _expand(paths: Iterable[Path | str]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def _unreadable(reason: str) -> RouteDecision:
    return RouteDecision(None, (), None, f"not routed: {reason}")


class UnreadableHeader(ValueError):
    """A file's routing header cannot be read; the message says why, for a route note."""


def read_route_dataset(path: Path) -> Dataset:
    """The routing attributes (:data:`ROUTE_KEYWORDS`) of a DICOM file, pixel data not read.

    Raises :class:`UnreadableHeader` naming the reason for anything pydicom cannot read: not DICOM,
    missing, unreadable, or truncated or malformed inside its header (pydicom raises EOFError,
    struct.error, BytesLengthException and others there)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(ROUTE_KEYWORDS))
    except InvalidDicomError:
        raise UnreadableHeader("not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from None
    except FileNotFoundError:
        raise UnreadableHeader("no such file") from None
    except OSError as exc:
        if exc.errno is None:  # pydicom's own "truncated file" errors
            raise UnreadableHeader(f"not a readable DICOM file ({exc})"[:300]) from exc
        raise UnreadableHeader(f"the file cannot be read ({exc.strerror})") from exc
    except (EOFError, BytesLengthException, *_VALUE_ERRORS) as exc:
        raise UnreadableHeader(f"not a readable DICOM file ({type(exc).__name__}: {exc})"[:300]) from exc


def _decide_file(rules: RuleSet, path: Path) -> tuple[RouteDecision, bool]:
    """The decision for one file, and whether the file could be read as DICOM."""
    try:
        ds = read_route_dataset(path)
    except UnreadableHeader as exc:
        return _unreadable(str(exc)), False
    header = with_pixel_region(route_header_from_dataset(ds), lambda: region_from_files([path]))
    return route(rules, header), True


def explain_files(rules: RuleSet, paths: Iterable[Path | str]) -> list[tuple[Path, RouteDecision]]:
    """The routing decision for each file (directories: every file below, sorted). Files that are
    not DICOM get a "not routed: not a DICOM file" decision instead of an exception."""
    return [(path, _decide_file(rules, path)[0]) for path in _expand(paths)]


def format_decision(path: Path | str, decision: RouteDecision, *, verbose: bool = False) -> str:
    """One line for the rule tester (plus the trace, indented, with ``verbose``)."""
    if decision.routed:
        models = ", ".join(decision.models)
        line = f"{path}: routed to {models} (grouping {decision.grouping}) by {decision.reason}"
    else:
        line = f"{path}: {decision.reason}"
    if verbose and decision.trace:
        line += "".join(f"\n    {step}" for step in decision.trace)
    return line


def explain_report(
    rules: RuleSet, paths: Iterable[Path | str], *, verbose: bool = False
) -> tuple[list[str], int]:
    """What ``pacs-node route FILE...`` prints, and its exit status: 0 when every file was read
    (routed or not), 1 when some could not be read as DICOM."""
    lines = []
    status = 0
    for path in _expand(paths):
        decision, readable = _decide_file(rules, path)
        lines.append(format_decision(path, decision, verbose=verbose))
        if not readable:
            status = 1
    return lines, status
