"""Recovery at start (recovery.py) on a real spool and index in tmp_path."""

from __future__ import annotations

from pathlib import Path

from dicom_ai.recovery import Recovered, orphan_called_ae, recover
from dicom_ai.store.index import Index, InstanceRecord, RunPlan
from dicom_ai.store.spool import Spool
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets


def test_recover_puts_right_what_a_killed_node_left(tmp_path: Path) -> None:
    spool, index = Spool(tmp_path / "spool"), Index(tmp_path / "index.sqlite3")
    try:
        # A partial temp file, an association left open, a job left running.
        (tmp_path / "spool" / "tmp" / "x.part").write_bytes(b"partial")
        datasets = list(phantom_ct_datasets(PhantomSpec(slices=3, rows=16, columns=16)))
        association = index.open_association("SCANNER", "AI_CT", "10.0.0.5")
        paths = []
        for ds in datasets:
            path = spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        uid = datasets[0].SeriesInstanceUID
        for path, ds in zip(paths[:2], datasets, strict=False):
            index.add_instance(
                InstanceRecord(
                    ds.SOPInstanceUID,
                    ds.SOPClassUID,
                    uid,
                    ds.StudyInstanceUID,
                    "CT",
                    path,
                    association,
                )
            )
        index.start_run(uid, [RunPlan("ct", "ct-body", ("pacs",))], "")
        index.claim_pending_jobs(1)
        # The third file is durable but its index row was lost (power loss).
        (tmp_path / "spool" / "instances" / "junk").mkdir()
        recovered = recover(spool, index, "AI_CT")
        assert recovered == Recovered(
            temp_files_removed=1,
            associations_closed=1,
            jobs_requeued=1,
            instances_reindexed=1,
            empty_folders_removed=1,  # junk
        )
        assert list((tmp_path / "spool" / "tmp").iterdir()) == []
        (pending,) = index.pending_series()
        assert pending.series_instance_uid == uid and pending.open_associations == 0
        # A known series keeps the association it came with.
        assert [s.called_ae for s in index.series_senders(uid)] == ["AI_CT"]
        assert [j.state for j in index.jobs()] == ["pending"]
        assert not recover(spool, index, "AI_CT")  # nothing left to put right
    finally:
        index.close()


def test_an_unreadable_spooled_file_is_logged_and_left(tmp_path: Path) -> None:
    spool, index = Spool(tmp_path / "spool"), Index(tmp_path / "index.sqlite3")
    try:
        bad = spool.instance_path("1.2", "1.2.3", "1.2.3.4")
        bad.parent.mkdir(parents=True)
        bad.write_bytes(b"not dicom")
        recovered = recover(spool, index, "DICOM_AI")
        assert recovered.instances_reindexed == 0
        assert index.unindexed([bad]) == [bad]
    finally:
        index.close()


def test_a_new_series_is_filed_under_the_one_title_or_the_nodes_own() -> None:
    assert orphan_called_ae(["AI_CT"], "DICOM_AI") == "AI_CT"
    assert orphan_called_ae(["AI_CT", "AI_MR"], "DICOM_AI") == "DICOM_AI"
