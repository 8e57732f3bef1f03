"""Training, export and evaluation of the bundled reference models (tools beside the node)."""
