"""Recovery at start: put right what an earlier process left half done.

Runs once, before the node receives or schedules anything. A ``kill -9`` or a power loss can
leave: partial temp files in the spool (never acknowledged, never referenced), associations
still marked open, jobs marked running, and, after a power loss, instance files that were
acknowledged (fsynced before Success) but whose index row was lost (the index commits with
``synchronous=NORMAL``), and a purge marked but not finished (store/retention.py's
`sweep`). Each is put right here, and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from dicom_ai.errors import InputError
from dicom_ai.store.header import parse_header
from dicom_ai.store.index import InstanceRecord, RecoveryIndex
from dicom_ai.store.retention import sweep
from dicom_ai.store.spool import Spool

__all__ = ["Recovered", "orphan_called_ae", "recover", "reindex_spooled_files"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recovered:
    temp_files_removed: int = 0
    associations_closed: int = 0
    jobs_requeued: int = 0
    instances_reindexed: int = 0
    purges_finished: int = 0  # series and result folders of interrupted purges
    empty_folders_removed: int = 0

    def __bool__(self) -> bool:
        return any(
            (
                self.temp_files_removed,
                self.associations_closed,
                self.jobs_requeued,
                self.instances_reindexed,
                self.purges_finished,
                self.empty_folders_removed,
            )
        )


def orphan_called_ae(called_ae_titles: Sequence[str], node_ae_title: str) -> str:
    """The called AE title a reindexed instance of a new series is filed under: the file
    does not say. With one title it is that one, else the node's own."""
    return called_ae_titles[0] if len(called_ae_titles) == 1 else node_ae_title


def recover(spool: Spool, index: RecoveryIndex, called_ae: str) -> Recovered:
    """Every recovery step, in order; ``called_ae``: see `orphan_called_ae`."""
    temp_files_removed = spool.remove_stale_temp_files()
    associations_closed = index.close_stale_associations()
    jobs_requeued = index.requeue_running_jobs()
    # Before reindexing: the files of an unfinished purge are not to be indexed again.
    swept = sweep(index, spool, empty_folders=True)
    recovered = Recovered(
        temp_files_removed=temp_files_removed,
        associations_closed=associations_closed,
        jobs_requeued=jobs_requeued,
        instances_reindexed=reindex_spooled_files(spool, index, called_ae),
        purges_finished=swept.series + swept.result_folders,
        empty_folders_removed=swept.empty_folders,
    )
    if (
        recovered.temp_files_removed
        or recovered.jobs_requeued
        or recovered.instances_reindexed
        or recovered.purges_finished
    ):
        log.info(
            "recovered: %d partial temp files removed, %d jobs resumed, %d instances "
            "reindexed, %d interrupted purges finished",
            recovered.temp_files_removed,
            recovered.jobs_requeued,
            recovered.instances_reindexed,
            recovered.purges_finished,
        )
    return recovered


def reindex_spooled_files(spool: Spool, index: RecoveryIndex, called_ae: str) -> int:
    """Index the instance files that a power loss kept out of the index; how many.

    A known series keeps the association it came with; a new one is filed under a recovery
    association to ``called_ae``."""
    orphans = index.unindexed(spool.instance_files())
    if not orphans:
        return 0
    association_id = index.open_association("", called_ae, "")
    reindexed = 0
    for path in orphans:
        try:
            header = parse_header(path.read_bytes())
        except (InputError, OSError) as exc:
            log.error("spooled file %s cannot be reindexed: %s", path, exc)
            continue
        known = index.series_last_association(header.series_instance_uid)
        index.add_instance(
            InstanceRecord(
                header.sop_instance_uid,
                header.sop_class_uid,
                header.series_instance_uid,
                header.study_instance_uid,
                header.modality,
                path,
                association_id if known is None else known,
                size=path.stat().st_size,
            )
        )
        reindexed += 1
    index.close_association(association_id)
    return reindexed
