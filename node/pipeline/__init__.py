"""pipeline stage of the node."""
