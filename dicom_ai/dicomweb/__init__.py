"""DICOMweb: send results to an origin server by STOW-RS."""

from dicom_ai.dicomweb.stow import stow_files

__all__ = ["stow_files"]
