"""The DIMSE status values (PS3.4 Annex B, PS3.7 Annex C) the node answers with, and how it reads
the ones it is answered with.

The categories and descriptions are pynetdicom's (``pynetdicom.status``); pynetdicom names no
constants for the individual failure codes, so the few the node answers with are named here.
"""

from pynetdicom.status import (
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    Status,
    code_to_category,
)

SUCCESS = int(Status.SUCCESS)
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
#: PS3.18 Table 10.5.3-2 (Store Instances Response failure reasons) beside the C-STORE ones:
#: the transfer syntax of a Part 10 file sent over STOW-RS is not one the node accepts.
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122


def name(status: int) -> str:
    """A readable name for a status value, e.g. 0xA700 -> 'Refused: Out of Resources (0xA700)'.

    The description is pynetdicom's table for the Storage Service Class (which includes the
    general statuses, STOW-RS's C122H aside); a value it does not know is shown by its category
    and number."""
    if status == SUCCESS:
        return "Success"
    if status == TRANSFER_SYNTAX_NOT_SUPPORTED:
        return f"Transfer Syntax Not Supported (0x{status:04X})"
    description = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", ""))[1]
    if description:
        return f"{description} (0x{status:04X})"
    category = code_to_category(status) if status >= 0 else "Unknown"
    if category != "Unknown":
        return f"{category} (0x{status:04X})"
    return f"status 0x{status:04X}"


def stored(status: int) -> bool:
    """Whether a C-STORE answered with ``status`` stored the instance: success or a warning."""
    return status >= 0 and code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING)
