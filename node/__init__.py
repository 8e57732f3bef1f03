"""pacs-node: a DICOM inference node for radiology (research models, not for diagnosis)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pacs-node")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+src"
