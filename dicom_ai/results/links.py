"""SEG and SR of one run point at each other (IHE AI Results: results stay together).

The SR already references the SEG in its content and evidence; the SEG gets the SR's series
in Related Series Sequence (General Series Module), so a viewer opening the SEG can find the
report without a query by content.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

__all__ = ["link_related_series"]


def link_related_series(seg: Dataset, sr: Dataset) -> None:
    """Add each result's series to the other's Related Series Sequence (same study)."""
    for this, other in ((seg, sr), (sr, seg)):
        item = Dataset()
        item.StudyInstanceUID = other.StudyInstanceUID
        item.SeriesInstanceUID = other.SeriesInstanceUID
        # Type 2: CID 7210 has no concept for "results of the same run".
        item.PurposeOfReferenceCodeSequence = DicomSequence()
        this.RelatedSeriesSequence = DicomSequence([item])
