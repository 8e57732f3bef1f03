"""web stage of the node."""
