"""The node's typed error hierarchy: each stage raises one of these; the runner records it once."""

from __future__ import annotations

from enum import StrEnum


class NodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(NodeError):
    """Configuration is invalid; the message names the field and the value found."""


class StoreError(NodeError):
    """The database or the spool could not do what was asked."""


class IngestError(NodeError):
    """A received instance was refused; carries the DICOM status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class DecodeError(NodeError):
    """Pixel data could not be decoded (unsupported transfer syntax, missing or short pixel data)."""


class BudgetExceeded(DecodeError):
    """An image (or data set) would take more memory than the node's budget allows (``limits``
    settings): refused before anything is decoded or inflated; the message names the limit and
    what the data claimed. Caused by the data: permanent."""


class ManifestError(NodeError):
    """A model manifest or its ONNX file is invalid; the message names the field."""


class PreprocessError(NodeError):
    """A preprocessing step could not be applied to an image."""


class OutputError(NodeError):
    """An output object (SR, secondary capture, parametric map) could not be built (from this data:
    building is deterministic, so the error is permanent)."""


class InferenceError(NodeError):
    """ONNX Runtime failed to run a model."""


class RefusalReason(StrEnum):
    """Which check refused a file handed in for one-off analysis (the values are part of the API)."""

    NOT_DICOM = "not_dicom"
    NO_PIXELS = "no_pixels"
    UNSUPPORTED_SYNTAX = "unsupported_syntax"
    UNSUPPORTED_PHOTOMETRIC = "unsupported_photometric"
    OVER_BUDGET = "over_budget"
    NO_RULES = "no_rules"
    NO_ROUTE = "no_route"
    NOT_LOADED = "not_loaded"
    UNDECODABLE = "undecodable"
    UNPROCESSABLE = "unprocessable"
    TIMEOUT = "timeout"
    FAILED = "failed"


class UploadRefused(NodeError):
    """A file handed in for one-off analysis cannot be analysed; ``reason`` says which check failed."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
