"""The resource budget of one instance: how large an image (and an inflated data set) the node
agrees to hold in memory, checked before anything is decoded or inflated.

A hostile or broken file is a few kilobytes that *claim* gigabytes (a JPEG frame header of
65535x65535x3, a JPEG 2000 SIZ of 40000x40000, a deflate bomb): the claim is read first and
refused, so the allocation never happens. The values come from ``Settings.limits``
(:meth:`node.settings.LimitsSettings.budget`); :data:`DEFAULT_BUDGET` holds the same defaults for
callers not (yet) handed the configured budget.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20


@dataclass(frozen=True, slots=True)
class Budget:
    """Limits per instance. ``max_frame_pixels``: Rows x Columns of one frame;
    ``max_frames``: NumberOfFrames; ``max_decoded_bytes``: the decoded pixel data of all frames;
    ``max_inflated_bytes``: a Deflated Explicit VR Little Endian data set once inflated."""

    max_frame_pixels: int = 2**26
    max_frames: int = 10_000
    max_decoded_bytes: int = 4096 * MIB
    max_inflated_bytes: int = 1024 * MIB


DEFAULT_BUDGET = Budget()
