"""Series -> volume -> model -> findings. Knows nothing of networks or DICOM encoding."""
