"""inference stage of the node."""
