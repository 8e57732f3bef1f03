"""Output writers: pure functions from an :class:`~node.types.AnalysisResult` (plus the source
data sets and the node's :class:`~node.types.OutputIdentity`) to pydicom data sets.

- :func:`node.outputs.sr.build_sr`: Comprehensive 3D SR, TID 1500 measurement report (IHE AIR).
- :func:`node.outputs.sc.build_heatmap_scs`: RGB secondary captures with the heatmap overlaid.
- :func:`node.outputs.pm.build_parametric_maps`: the heatmaps as data (Parametric Map).
- :mod:`node.outputs.identity`: deterministic UIDs under the configured organisation root.

Nothing here touches the disk, the network or the database; every writer raises
:class:`OutputError` when it cannot build its object.
"""

from node.errors import OutputError

__all__ = ["OutputError"]
