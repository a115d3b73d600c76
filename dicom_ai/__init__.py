"""dicom-ai: a DICOM node that routes series to MONAI models and returns SEG and SR."""

__version__ = "0.1.0"
__all__ = ["__version__"]
