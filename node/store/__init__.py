"""store stage of the node."""
