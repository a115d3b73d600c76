"""SEG and SR of one run point at each other (IHE AI Results: results stay together).

The SR references the SEG in its content and lists it in its evidence; the SEG gets the SR's
series in Related Series Sequence (General Series Module), so a viewer opening the SEG can
find the report. The SR gets no such sequence: its SR Document Series Module has none.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

__all__ = ["link_related_series"]


def link_related_series(seg: Dataset, sr: Dataset) -> None:
    """Name the SR's series (same study) in the SEG's Related Series Sequence."""
    item = Dataset()
    item.StudyInstanceUID = sr.StudyInstanceUID
    item.SeriesInstanceUID = sr.SeriesInstanceUID
    # Type 2: CID 7210 has no concept for "results of the same run".
    item.PurposeOfReferenceCodeSequence = DicomSequence()
    seg.RelatedSeriesSequence = DicomSequence([item])
