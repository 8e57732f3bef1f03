"""The node's typed error hierarchy: each stage raises one of these; the runner records it once."""


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


class UploadRefused(NodeError):
    """A file handed in for one-off analysis cannot be analysed. ``reason`` says which check failed:
    not_dicom, no_pixels, unsupported_syntax, over_budget, no_rules, no_route, not_loaded, undecodable,
    unprocessable, timeout or failed."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
