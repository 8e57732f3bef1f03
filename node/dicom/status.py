"""Named DIMSE status values (PS3.4 Annex B, PS3.7 Annex C) the node answers with."""

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

NAMES = {
    SUCCESS: "Success",
    PROCESSING_FAILURE: "Processing failure",
    SOP_CLASS_NOT_SUPPORTED: "Refused: SOP class not supported",
    OUT_OF_RESOURCES: "Refused: out of resources",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "Error: data set does not match SOP class",
    CANNOT_UNDERSTAND: "Error: cannot understand",
}


def name(status: int) -> str:
    """A readable name for a status value, e.g. 0xA700 -> 'Refused: out of resources'."""
    return NAMES.get(status, f"status 0x{status:04X}")
