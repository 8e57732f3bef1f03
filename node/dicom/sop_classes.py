"""The storage SOP classes the SCP accepts: every one DCMTK's storescp accepts, and more.

pynetdicom's storage registry holds the current storage SOP classes; DCMTK's storescp also accepts
the retired ones (Ultrasound Image Storage (Retired), Nuclear Medicine Image Storage (Retired),
the trial SR classes...) and a few pynetdicom does not list (DICOS, Eddy Current), which old
modalities still send. Those come from pydicom's UID dictionary, not a hand-typed list: every
"SOP Class" whose name says Storage and that no pynetdicom service class claims already.
"""

from __future__ import annotations

import logging
import threading

from pydicom._uid_dict import UID_dictionary
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import register_uid, uid_to_service_class

log = logging.getLogger(__name__)

# Named "Storage" in the dictionary but not SOP classes one stores over C-STORE.
_NOT_STORAGE = {
    "1.2.840.10008.1.3.10",  # Media Storage Directory Storage (DICOMDIR, media only)
}
_registered = threading.Lock()


def _unlisted_storage_classes(listed: set[str]) -> dict[str, str]:
    """UID -> keyword of the storage SOP classes in pydicom's dictionary that pynetdicom does not
    list (mostly retired ones); those another pynetdicom service class claims are left out."""
    found: dict[str, str] = {}
    for uid, (name, kind, _info, _retired, keyword) in UID_dictionary.items():
        if kind != "SOP Class" or "Storage" not in name or "Storage Commitment" in name:
            continue
        if uid in _NOT_STORAGE or uid in listed:
            continue
        # ServiceClass: unknown to pynetdicom; StorageServiceClass: registered by an earlier call
        if uid_to_service_class(uid) in (ServiceClass, StorageServiceClass):
            found[uid] = keyword
    return found


def storage_sop_classes() -> list[str]:
    """Every storage SOP class UID the SCP supports: pynetdicom's storage classes, then the
    retired and other storage classes from pydicom's dictionary that pynetdicom lacks.

    Also registers the latter with pynetdicom as storage classes (idempotent), so that a C-STORE
    request naming one is dispatched to the storage service instead of aborting the association.
    """
    current = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    extra = _unlisted_storage_classes(set(current))
    with _registered:
        for uid, keyword in extra.items():
            if uid_to_service_class(uid) is ServiceClass:
                register_uid(uid, keyword, StorageServiceClass)
    if extra:
        log.debug("accepting %d storage SOP classes pynetdicom does not list", len(extra))
    return current + list(extra)
