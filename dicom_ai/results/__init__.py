"""Findings -> standard DICOM results: a BINARY SEG and a TID 1500 Comprehensive 3D SR.

    uids = result_uids(source_series_uid, model_id, model_version)
    device = DeviceIdentity.for_node(node_id)
    seg = build_seg(headers, findings, uids, device)
    sr = build_sr(headers, seg, findings, uids, device)

``headers`` are the source series' datasets; Pixel Data is not needed.
"""

from dicom_ai.results.codes import (
    LOCAL_CODING_SCHEME_DESIGNATOR,
    SegmentCoding,
    normalize_label_name,
    segment_coding,
)
from dicom_ai.results.device import DeviceIdentity
from dicom_ai.results.links import link_related_series
from dicom_ai.results.seg import algorithm_family_code, build_seg
from dicom_ai.results.sr import (
    build_classification_sr,
    build_detection_sr,
    build_image_detection_sr,
    build_landmark_sr,
    build_sr,
    procedure_reported,
)
from dicom_ai.results.uids import ResultUIDs, result_uids

__all__ = [
    "LOCAL_CODING_SCHEME_DESIGNATOR",
    "DeviceIdentity",
    "ResultUIDs",
    "SegmentCoding",
    "algorithm_family_code",
    "build_classification_sr",
    "build_detection_sr",
    "build_image_detection_sr",
    "build_landmark_sr",
    "build_seg",
    "build_sr",
    "link_related_series",
    "normalize_label_name",
    "procedure_reported",
    "result_uids",
    "segment_coding",
]
