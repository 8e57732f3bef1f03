"""dicom stage of the node."""
