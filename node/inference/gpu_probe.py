"""Whether this node can prepare model inputs on the GPU (issue 16, item 3), and if not, why.

Preparation on the GPU (:mod:`node.inference.gpu_prepare`) needs three things, checked in this
order, each lazily (nothing here imports CuPy or nvImageCodec at module import):

1. the model's session really runs on CUDA (``ModelSession.active_provider`` is
   ``CUDAExecutionProvider``: a tensor prepared on the device is of no use to a CPU session);
2. CuPy imports and sees a CUDA device (it holds the prepared frames and does the arithmetic);
3. optionally, nvImageCodec (``from nvidia import nvimgcodec``): JPEG, JPEG 2000 and HTJ2K frames
   are then decoded on the device. Without it the GPU path still runs: compressed frames are
   decoded on the CPU and uploaded, uncompressed frames are uploaded as they are.

The answer is cached per provider and its reason logged once, at info.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"


@dataclass(frozen=True)
class GpuPreparation:
    """What the GPU preparation can do here. ``usable``: prepare on the device (CUDA session,
    CuPy, a device); ``device_decode``: nvImageCodec decodes compressed frames there too;
    ``reason``: why not (or what is missing), empty when everything is there."""

    usable: bool
    device_decode: bool
    reason: str

    def __iter__(self) -> Iterator[bool | str]:
        """``usable, reason = gpu_preparation(provider)``."""
        return iter((self.usable, self.reason))


def _import(name: str) -> tuple[Any | None, str]:
    """The module, or None and why it cannot be imported (the exception's type and text)."""
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # ImportError, or a CUDA library that fails to load at import
        return None, f"{type(exc).__name__}: {exc}"


def _device_count(cupy: Any) -> tuple[int, str]:
    """CUDA devices CuPy sees (0 and why when it cannot ask: no driver, no device)."""
    try:
        return int(cupy.cuda.runtime.getDeviceCount()), ""
    except Exception as exc:  # cupy raises CUDARuntimeError without a driver or a device
        return 0, f"{type(exc).__name__}: {exc}"


@functools.cache
def gpu_preparation(provider: str) -> GpuPreparation:
    """Whether frames for a model whose active execution provider is ``provider`` can be
    prepared on the GPU here (see the module text); the reason is logged once per provider."""
    found = _probe(provider)
    if found.usable and found.device_decode:
        log.info("preparation on the GPU: decode (nvImageCodec), window and resize (CuPy)")
    elif found.usable:
        log.info("preparation on the GPU (CuPy); %s", found.reason)
    else:
        log.info("preparation on the CPU: %s", found.reason)
    return found


def _probe(provider: str) -> GpuPreparation:
    if provider != CUDA_PROVIDER:
        return GpuPreparation(False, False, f"the model runs on {provider}, not {CUDA_PROVIDER}")
    cupy, why = _import("cupy")
    if cupy is None:
        return GpuPreparation(False, False, f"cupy is not installed ({why})")
    count, why = _device_count(cupy)
    if count <= 0:
        return GpuPreparation(False, False, f"no CUDA device ({why or 'cupy sees none'})")
    codec, why = _import("nvidia.nvimgcodec")
    if codec is None:
        log.debug("nvimgcodec import failed: %s", why)
        return GpuPreparation(
            True, False, "nvimgcodec missing: compressed frames decode on the CPU and are uploaded"
        )
    return GpuPreparation(True, True, "")
