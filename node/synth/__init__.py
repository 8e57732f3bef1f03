"""synth stage of the node."""
