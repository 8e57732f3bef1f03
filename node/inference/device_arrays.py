"""Arrays that may live on a GPU (CuPy from node/inference/gpu_prepare.py, or host NumPy arrays),
handled without the node importing a GPU array library itself: what the preparation, the
batcher, the sessions and the analysis share to tell them apart, join them and bring them home."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from node.errors import InferenceError


def is_device_array(x: object) -> bool:
    """True for an array in GPU memory (``__cuda_array_interface__``: CuPy, Numba, PyTorch CUDA)."""
    return hasattr(x, "__cuda_array_interface__")


def array_module(x: object) -> ModuleType:
    """The package of ``x``'s type (``cupy`` for a CuPy array), found among the imported modules:
    the node never imports a GPU array library itself."""
    name = type(x).__module__.split(".")[0]
    module = sys.modules.get(name)
    if module is None:  # pragma: no cover - an object's own package is imported by construction
        raise InferenceError(f"the array's package {name} is not imported")
    return module


def to_host(x: Any) -> np.ndarray:
    """A numpy copy of a device array (``x.get()`` as CuPy offers, ``x.cpu()`` as PyTorch does,
    else ``np.asarray``); a numpy array is returned as it is."""
    if isinstance(x, np.ndarray):
        return x
    get = getattr(x, "get", None)
    if callable(get):
        return np.asarray(get())
    cpu = getattr(x, "cpu", None)
    if callable(cpu):
        return np.asarray(cpu().numpy())
    return np.asarray(x)


def concatenate(arrays: Sequence[Any]) -> Any:
    """``arrays`` (all host, or all on one device) joined along the first axis with their own
    library, on their device (numpy's refuses CuPy arrays)."""
    xp = array_module(arrays[0]) if is_device_array(arrays[0]) else np
    return xp.concatenate(list(arrays))  # along the first axis
