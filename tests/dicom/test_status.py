"""DIMSE status names and the stored/not-stored reading come from pynetdicom's tables."""

import pytest
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from node.dicom import status


@pytest.mark.parametrize(
    "code",
    [
        status.PROCESSING_FAILURE,
        status.DUPLICATE_SOP_INSTANCE,
        status.SOP_CLASS_NOT_SUPPORTED,
        status.OUT_OF_RESOURCES,
        status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        status.CANNOT_UNDERSTAND,
        0xA7FF,
        0xB007,
    ],
)
def test_names_are_pynetdicoms_description_with_the_number(code: int) -> None:
    assert status.name(code) == f"{STORAGE_SERVICE_CLASS_STATUS[code][1]} (0x{code:04X})"


def test_names_of_success_stow_syntax_and_unknown_values() -> None:
    assert status.name(status.SUCCESS) == "Success"
    assert status.name(status.TRANSFER_SYNTAX_NOT_SUPPORTED) == "Transfer Syntax Not Supported (0xC122)"
    assert status.name(0x0001) == "Warning (0x0001)"
    assert status.name(0x9999) == "status 0x9999"


@pytest.mark.parametrize(
    ("code", "kept"),
    [
        (0x0000, True),
        (0xB000, True),  # coercion of data elements
        (0xB006, True),  # elements discarded
        (0xB007, True),  # data set does not match the SOP class (warning)
        (0x0107, True),  # general warning: attribute list error
        (0xA700, False),
        (0xA900, False),
        (0xC000, False),
        (0x0110, False),
        (0x0111, False),
        (0xFE00, False),  # cancel
        (0xFF00, False),  # pending is not an answer
        (0x9999, False),
    ],
)
def test_stored_means_success_or_warning(code: int, kept: bool) -> None:
    assert status.stored(code) is kept
