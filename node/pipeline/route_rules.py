"""The routing rules file: its schema (pydantic, strict, unknown fields refused) and its loading.

A rules file (``config/routes.yaml``) holds two lists, both read top to bottom:

``exclude``
    Conditions that keep an object away from every model (derived images, localizers, non-image
    objects...). They are checked first; the first one that matches decides "not routed".
``rules``
    Each names a ``match`` condition, the ``models`` to run and the ``grouping`` (``image``,
    ``series`` or ``study``). **The first enabled rule that matches wins**; later rules are not
    looked at. Put specific rules before fallbacks.

A condition is a mapping whose fields are all required to hold (AND):

- ``modality``, ``sop_class_uid``, ``body_part`` (BodyPartExamined), ``view_position``,
  ``laterality`` (ImageLaterality, else Laterality): one value or a list meaning "any of";
  compared stripped and case-insensitively.
- ``image_type``: one value or a list; **every** value must be present in ImageType.
  ``image_type_any``: one value or a list; **at least one** must be present in ImageType.
- ``body_region``: one region or a list ("any of"): HEAD, NECK, CHEST, ABDOMEN, PELVIS, TRUNK or
  OTHER, derived by :mod:`node.pipeline.region` from BodyPartExamined, AnatomicRegionSequence /
  FrameAnatomySequence codes, the descriptions and, for CT and MR naming none, the pixels. An
  unknown region never holds. Checked last, so the pixels are read only when all else holds.
- ``anatomic_region``: one code or a list ("any of"), each ``SCHEME:VALUE`` (e.g.
  ``SCT:39937001``, Skin) or a bare code value; holds when an item of the top-level
  AnatomicRegionSequence carries one of them (scheme and value compared case-insensitively).
- ``series_description``, ``protocol_name``, ``study_description``: a regular expression (or a
  list: any of them), searched anywhere in the text, case-insensitive unless ``case_sensitive:
  true``. ``any_description``: the same, holding when any of the three descriptions matches.
- ``missing`` / ``present``: header fields that must be absent (or empty) / present.
- ``all`` (list, every one holds), ``any`` (list, at least one holds), ``not`` (one condition,
  which must not hold).

This module only parses and validates; :mod:`node.pipeline.route` evaluates.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from node.errors import ConfigError
from node.files import read_yaml

#: Header fields a condition can name in ``missing`` / ``present``, with their DICOM keywords.
HEADER_FIELDS: dict[str, str] = {
    "modality": "Modality",
    "sop_class_uid": "SOPClassUID",
    "body_part": "BodyPartExamined",
    "view_position": "ViewPosition",
    "image_type": "ImageType",
    "laterality": "ImageLaterality/Laterality",
    "series_description": "SeriesDescription",
    "protocol_name": "ProtocolName",
    "study_description": "StudyDescription",
    "anatomic_region": "AnatomicRegionSequence",
}
HeaderField = Literal[
    "modality",
    "sop_class_uid",
    "body_part",
    "view_position",
    "image_type",
    "laterality",
    "series_description",
    "protocol_name",
    "study_description",
    "anatomic_region",
]
Grouping = Literal["image", "series", "study"]
#: The regions :mod:`node.pipeline.region` derives (upper case, as written in the rules).
BodyRegion = Literal["HEAD", "NECK", "CHEST", "ABDOMEN", "PELVIS", "TRUNK", "OTHER"]

#: Coded-string fields matched against value lists ("any of").
VALUE_FIELDS: tuple[str, ...] = ("modality", "sop_class_uid", "body_part", "view_position", "laterality")
#: Text fields matched with regular expressions.
REGEX_FIELDS: tuple[str, ...] = ("series_description", "protocol_name", "study_description")

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_MODEL_ID_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"  # as a model manifest's id


def _as_list(value: Any) -> Any:
    """A single string stands for a one-item list."""
    return [value] if isinstance(value, str) else value


def _upper_list(value: Any) -> Any:
    """A single string stands for a one-item list; region names are compared in upper case."""
    value = _as_list(value)
    return (
        [v.strip().upper() if isinstance(v, str) else v for v in value] if isinstance(value, list) else value
    )


Value = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]
ValueList = Annotated[list[Value], BeforeValidator(_as_list), Field(min_length=1)]
PatternList = Annotated[list[Annotated[str, StringConstraints(min_length=1)]], BeforeValidator(_as_list)]
_CODE_PATTERN = r"^(?:[A-Za-z0-9_.-]{1,16}:)?[A-Za-z0-9_.-]{1,64}$"
CodeList = Annotated[
    list[Annotated[str, StringConstraints(strip_whitespace=True, pattern=_CODE_PATTERN)]],
    BeforeValidator(_as_list),
    Field(min_length=1),
]
ModelId = Annotated[str, StringConstraints(pattern=_MODEL_ID_PATTERN, max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, populate_by_name=False)


class Condition(_Strict):
    """One condition object; every field given must hold (see the module docstring)."""

    modality: ValueList | None = None
    sop_class_uid: ValueList | None = None
    body_part: ValueList | None = None
    view_position: ValueList | None = None
    laterality: ValueList | None = None
    image_type: ValueList | None = None
    image_type_any: ValueList | None = None
    anatomic_region: CodeList | None = None
    body_region: Annotated[list[BodyRegion], BeforeValidator(_upper_list), Field(min_length=1)] | None = None
    series_description: PatternList | None = None
    protocol_name: PatternList | None = None
    study_description: PatternList | None = None
    any_description: PatternList | None = None
    case_sensitive: bool = False
    missing: Annotated[list[HeaderField], BeforeValidator(_as_list), Field(min_length=1)] | None = None
    present: Annotated[list[HeaderField], BeforeValidator(_as_list), Field(min_length=1)] | None = None
    all_: list[Condition] | None = Field(default=None, alias="all", min_length=1)
    any_: list[Condition] | None = Field(default=None, alias="any", min_length=1)
    not_: Condition | None = Field(default=None, alias="not")

    _patterns: dict[str, tuple[re.Pattern[str], ...]] = PrivateAttr(default_factory=dict)

    @field_validator("series_description", "protocol_name", "study_description", "any_description")
    @classmethod
    def _valid_regex(cls, patterns: list[str] | None) -> list[str] | None:
        if patterns is None:
            return None
        if not patterns:
            raise ValueError("give at least one regular expression")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r} ({exc.msg})") from None
        return patterns

    @model_validator(mode="after")
    def _not_empty(self) -> Condition:
        given = [name for name in type(self).model_fields if name != "case_sensitive"]
        if all(getattr(self, name) is None for name in given):
            raise ValueError(
                "empty condition: name at least one of "
                + ", ".join(k for k in _condition_keys() if k != "case_sensitive")
                + " (fields are ANDed)"
            )
        return self

    def model_post_init(self, context: Any, /) -> None:
        """Compile the regular expressions once."""
        flags = 0 if self.case_sensitive else re.IGNORECASE
        for name in (*REGEX_FIELDS, "any_description"):
            patterns = getattr(self, name)
            if patterns:
                self._patterns[name] = tuple(re.compile(p, flags) for p in patterns)

    def patterns(self, name: str) -> tuple[re.Pattern[str], ...]:
        """The compiled expressions of a regex field (empty when not given)."""
        return self._patterns.get(name, ())


class Rule(_Strict):
    """Route what ``match`` accepts to ``models``, grouped by ``grouping``."""

    name: Annotated[str, StringConstraints(pattern=_NAME_PATTERN, max_length=64)]
    description: str | None = None
    enabled: bool = True
    match: Condition
    models: Annotated[list[ModelId], BeforeValidator(_as_list), Field(min_length=1)]
    grouping: Grouping

    @field_validator("models")
    @classmethod
    def _unique_models(cls, models: list[str]) -> list[str]:
        seen = set()
        for model in models:
            if model in seen:
                raise ValueError(f"model {model!r} is listed twice")
            seen.add(model)
        return models


class Exclusion(_Strict):
    """Keep what ``match`` accepts away from every model; ``description`` says why, in words."""

    name: Annotated[str, StringConstraints(pattern=_NAME_PATTERN, max_length=64)]
    description: str | None = None
    enabled: bool = True
    match: Condition


class RulesFile(_Strict):
    """The whole rules file."""

    version: Literal[1] = 1
    exclude: list[Exclusion] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=list)


@dataclass(frozen=True)
class RuleSet:
    """Validated rules, in order, with the file they came from (for messages)."""

    source: str
    exclusions: tuple[Exclusion, ...]
    rules: tuple[Rule, ...]

    def rule_label(self, index: int) -> str:
        """``rules.3 (cxr)``: how messages name a rule."""
        return f"rules.{index} ({self.rules[index].name})"


def _condition_keys() -> list[str]:
    return [f.alias or name for name, f in Condition.model_fields.items()]


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the mapping that holds the unknown key at ``loc``."""
    parent = loc[:-1]
    if not parent:
        return [f.alias or n for n, f in RulesFile.model_fields.items()]
    if len(parent) == 2 and parent[0] == "rules":
        return list(Rule.model_fields)
    if len(parent) == 2 and parent[0] == "exclude":
        return list(Exclusion.model_fields)
    return _condition_keys()


def _entry_name(data: Any, section: str, index: int) -> str | None:
    try:
        name = data[section][index].get("name")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def _describe(data: Any, error: Any) -> str:
    loc = tuple(error["loc"])
    head = ""
    rest = loc
    if len(loc) >= 2 and loc[0] in ("rules", "exclude") and isinstance(loc[1], int):
        name = _entry_name(data, loc[0], loc[1])
        head = f"{loc[0]}.{loc[1]}" + (f" ({name})" if name else "")
        rest = loc[2:]
    where = ".".join(str(p) for p in rest)
    location = ": ".join(p for p in (head, where) if p) or "(top level)"
    kind = error["type"]
    message = str(error["msg"])
    if kind == "extra_forbidden":
        message = "unknown field; allowed: " + ", ".join(_allowed_keys(loc))
    elif kind == "value_error":
        message = message.removeprefix("Value error, ")
    elif kind == "too_short":
        message = "must not be empty"
    elif kind == "string_pattern_mismatch" and rest[:1] == ("models",):
        message = f"not a model id {error.get('input')!r}: use lower-case letters, digits, '.', '_' or '-'"
    elif kind == "string_pattern_mismatch" and rest[-1:] == ("name",):
        message = f"not a valid name {error.get('input')!r}: use letters, digits, '.', '_' or '-'"
    elif kind == "list_type":
        message = f"expected a text value or a list of them (found {error.get('input')!r})"
    else:
        found = error.get("input")
        if not isinstance(found, dict) and kind != "missing":
            message += f" (found {found!r})"
    return f"{location}: {message}"


def parse_rules(data: Any, source: str = "<rules>") -> RuleSet:
    """Validate already-parsed rules (a mapping as read from YAML); raise ConfigError naming the
    file, the rule (index and name) and the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'exclude' and 'rules' at the top level")
    try:
        parsed = RulesFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(data, e) for e in exc.errors())
        raise ConfigError(f"{source}: {problems}") from None
    seen: dict[str, str] = {}
    sections: tuple[tuple[str, Sequence[Exclusion | Rule]], ...] = (
        ("exclude", parsed.exclude),
        ("rules", parsed.rules),
    )
    for section, entries in sections:
        for index, entry in enumerate(entries):
            here = f"{section}.{index} ({entry.name})"
            if entry.name in seen:
                raise ConfigError(f"{source}: {here}: name: duplicate of {seen[entry.name]}")
            seen[entry.name] = here
    return RuleSet(source=source, exclusions=tuple(parsed.exclude), rules=tuple(parsed.rules))


def load_rules(path: Path | str) -> RuleSet:
    """Read and validate a rules file (YAML); raise ConfigError with the file, rule and field."""
    path = Path(path)
    data = read_yaml(path, "routing rules file", ConfigError)
    return parse_rules(data if data is not None else {}, str(path))
