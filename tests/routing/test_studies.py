"""Study rules: role selection and the start rule (pure), then through the index and the
scheduler with a fake worker pool, one `step` at a time."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicom_ai.assembly import AssemblyPolicy
from dicom_ai.config import Config, NodeConfig
from dicom_ai.errors import ConfigError
from dicom_ai.pipeline.scheduler import JobSpecs, Scheduler
from dicom_ai.routing import LiveRules, parse_rules
from dicom_ai.routing.studies import decide, select_roles
from dicom_ai.store.index import Index, InstanceRecord, StudyMember
from dicom_ai.store.spool import Spool
from dicom_ai.store.states import DeliveryState, JobState
from dicom_ai.synthetic import PhantomSpec, phantom_ct_datasets
from tests.inference.test_scheduler import FakeWorkers

RULES = """
rules:
  - name: tumour
    match: {Modality: {equals: CT}}
    model: ct-body
    destinations: [pacs]
    urgent: {calling_ae: {equals: ED_CT}}
    study:
      reference: t1c
      deadline_seconds: 60
      roles:
        - {name: t1c, match: {SeriesDescription: {regex: "^T1C"}}}
        - {name: t1, match: {SeriesDescription: {regex: "^T1$"}}}
        - {name: flair, match: {SeriesDescription: {regex: "FLAIR"}}, required: false}
  - name: body
    match: {SeriesDescription: {equals: BODY}}
    model: ct-body
    destinations: [pacs]
"""


def _study(rules: str = RULES):  # type: ignore[no-untyped-def]
    study = parse_rules(rules).rules[0].study
    assert study is not None
    return study


def _member(uid: str, roles: tuple[str, ...], at: float, **kw: object) -> StudyMember:
    return StudyMember(uid, roles, kw.pop("order", ()), kw.pop("n", 10), 1, at, **kw)  # type: ignore[arg-type]


# -- pure ---------------------------------------------------------------------------------------


def test_a_role_takes_the_latest_series_and_says_so() -> None:
    members = [_member("a", ("t1c",), 1.0), _member("b", ("t1c",), 2.0), _member("c", ("t1",), 3)]
    selection = select_roles(_study(), members)
    assert [(r, m.series_instance_uid if m else None) for r, m in selection.chosen] == [
        ("t1c", "b"),
        ("t1", "c"),
        ("flair", None),
    ]
    assert selection.missing_optional == ("flair",) and not selection.missing_required
    assert any("chose b (received last) over a" in note for note in selection.notes)


def test_most_slices_and_position_by_acquisition_time() -> None:
    study = _study(
        RULES.replace("- {name: t1c, match", "- {name: t1c, choose: most_slices, match").replace(
            '- {name: t1, match: {SeriesDescription: {regex: "^T1$"}}}',
            "- {name: t1, order_by: AcquisitionTime, position: 2}",
        )
    )
    members = [
        _member("big", ("t1c", "t1"), 1.0, n=40, order=(("t1", "101500"),)),
        _member("small", ("t1c", "t1"), 2.0, n=5, order=(("t1", "101000"),)),
    ]
    chosen = dict(select_roles(study, members).chosen)
    assert chosen["t1c"] is not None and chosen["t1c"].series_instance_uid == "big"
    # Position counts every series fitting the role, taken or not: the second in time.
    assert chosen["t1"] is not None and chosen["t1"].series_instance_uid == "big"


def test_a_series_fills_one_role_and_purged_ones_none() -> None:
    members = [_member("x", ("t1c", "t1"), 1.0), _member("p", ("t1",), 2.0, purged=True)]
    selection = select_roles(_study(), members)
    assert selection.found == ("t1c",)
    assert selection.missing_required == ("t1",)
    assert any("purged: p" in note for note in selection.notes)


def test_decide_waits_then_fails_or_runs_without_the_optional_role() -> None:
    study = _study()
    only_t1c = [_member("a", ("t1c",), 1.0)]
    both = [*only_t1c, _member("b", ("t1",), 2.0)]
    waiting = decide(study, both, deadline_at=100, now=50, last_run=None)
    assert waiting.action == "wait" and "flair (optional)" in waiting.note
    failed = decide(study, only_t1c, deadline_at=100, now=100, last_run=None)
    assert (failed.action, failed.note) == ("fail", "required role t1 missing")
    run = decide(study, both, deadline_at=100, now=100, last_run=None)
    assert run.action == "start" and "without optional role(s) flair" in run.note
    again = decide(study, both, deadline_at=100, now=200, last_run=run.selection.key)
    assert again.action == "keep"
    patient = decide(
        _study(
            RULES.replace("deadline_seconds: 60", "deadline_seconds: 60\n      at_deadline: wait")
        ),
        only_t1c,
        deadline_at=100,
        now=100,
        last_run=None,
    )
    assert patient.action == "wait" and "still waiting for required role t1" in patient.note


def test_held_member_results_hold_the_study_run() -> None:
    members = [
        _member("a", ("t1c",), 1.0, hold_until=150.0),
        _member("b", ("t1",), 2.0),
        _member("c", ("flair",), 2.0, hold_until=120.0),
    ]
    run = decide(_study(), members, deadline_at=1000, now=100, last_run=None)
    assert (run.action, run.hold_until) == ("start", 150.0)


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ("reference: nope", "'nope' is not one of the roles"),
        ("reference: flair", "reference role 'flair' must be required"),
        ("roles:\n        - {name: t1c, order_by: AcquisitionTime}", "order_by and position"),
    ],
)
def test_bad_study_blocks_are_refused(snippet: str, message: str) -> None:
    text = RULES.replace("reference: t1c", snippet) if "reference" in snippet else RULES
    if "order_by" in snippet:
        text = RULES.replace("roles:", snippet, 1).replace(
            '- {name: t1c, match: {SeriesDescription: {regex: "^T1C"}}}', "", 1
        )
    with pytest.raises(ConfigError, match=message):
        parse_rules(text)


# -- through the index and the scheduler ---------------------------------------------------------


class StudyHarness:
    def __init__(self, tmp_path: Path, workers: int = 1) -> None:
        rules = tmp_path / "rules.yaml"
        rules.write_text(RULES)
        self.config = Config(node=NodeConfig(data_dir=tmp_path, port=0), rules=rules)
        self.spool = Spool(tmp_path / "spool")
        self.index = Index(tmp_path / "index.sqlite3")
        self.pool = FakeWorkers(workers)
        live = LiveRules({t: c.rules for t, c in self.config.called_ae_table().items()})
        self.scheduler = Scheduler(
            self.index,
            self.pool,
            live,
            AssemblyPolicy(quiet_seconds=5, release_grace_seconds=1),
            JobSpecs(self.config, self.spool),
            max_job_attempts=2,
        )
        self.study_uid = "1.2.826.0.1.3680043.8.498.77"

    def send(self, description: str, slices: int = 2, calling: str = "MR1") -> str:
        spec = PhantomSpec(
            slices=slices,
            rows=8,
            columns=8,
            study_instance_uid=self.study_uid,
            series_description=description,
        )
        association = self.index.open_association(calling, "DICOM_AI", "127.0.0.1")
        for ds in phantom_ct_datasets(spec):
            self._store(ds, association)
        self.index.close_association(association)
        return spec.series_instance_uid

    def _store(self, ds: Dataset, association: int) -> None:
        path = self.spool.instance_path(
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        self.index.add_instance(
            InstanceRecord(
                ds.SOPInstanceUID,
                ds.SOPClassUID,
                ds.SeriesInstanceUID,
                ds.StudyInstanceUID,
                ds.Modality,
                path,
                association,
            )
        )

    def settle(self, now: float) -> None:
        """Steps until the series sent are routed (release grace passed at ``now``)."""
        for _ in range(3):
            self.scheduler.step(now)

    def study_jobs(self) -> list[tuple[int, str, str | None]]:
        rows = self.index._query(
            "SELECT id, state, error FROM jobs WHERE study_instance_uid IS NOT NULL ORDER BY id"
        )
        return [(int(r[0]), str(r[1]), r[2]) for r in rows]


@pytest.fixture
def h(tmp_path: Path) -> Iterator[StudyHarness]:
    harness = StudyHarness(tmp_path)
    yield harness
    harness.index.close()


def test_a_study_job_starts_when_every_role_came_and_names_them(h: StudyHarness) -> None:
    t1 = h.send("T1")
    h.settle(time.time() + 2)
    assert h.study_jobs() == []
    (waiting,) = h.index.studies()
    assert waiting.state == "waiting" and "t1c (required)" in (waiting.note or "")
    t1c = h.send("T1C", slices=3)
    flair = h.send("AX FLAIR")
    h.settle(time.time() + 2)
    ((job_id, state, _),) = h.study_jobs()
    assert state == "running"
    (spec,) = h.pool.submitted
    assert spec.series_instance_uid == t1c and spec.reference_role == "t1c"
    assert [(r.role, r.series_instance_uid, len(r.instance_paths)) for r in spec.roles] == [
        ("t1c", t1c, 3),
        ("t1", t1, 2),
        ("flair", flair, 2),
    ]
    assert spec.result_key == f"study/{h.study_uid}/tumour"
    assert spec.instance_paths == spec.roles[0].instance_paths
    h.pool.finish(job_id)
    h.scheduler.step(time.time() + 3)
    assert [d.state for d in h.index.deliveries()] == [DeliveryState.PENDING]


def test_a_late_series_for_a_role_reruns_and_supersedes(h: StudyHarness) -> None:
    for description in ("T1C", "T1", "FLAIR"):
        h.send(description)
    h.settle(time.time() + 2)
    ((first, _, _),) = h.study_jobs()
    h.pool.finish(first)
    h.scheduler.step(time.time() + 2)
    newer = h.send("T1C REPEAT")
    h.settle(time.time() + 4)
    (_, (second, state, _)) = h.study_jobs()
    assert state == "running"
    assert h.pool.submitted[-1].roles[0].series_instance_uid == newer
    h.pool.finish(second)
    h.scheduler.step(time.time() + 5)
    states = {d.job_id: d.state for d in h.index.deliveries()}
    assert states == {first: DeliveryState.SUPERSEDED, second: DeliveryState.PENDING}
    # An unrelated series of the study changes nothing.
    h.send("BODY")
    h.settle(time.time() + 6)
    assert len(h.study_jobs()) == 2


def test_at_the_deadline_a_missing_required_role_fails_the_job_naming_it(
    h: StudyHarness,
) -> None:
    h.send("T1C")
    h.settle(time.time() + 2)
    h.scheduler.step(time.time() + 61)
    ((job_id, state, error),) = h.study_jobs()
    assert (state, error) == ("failed", "required role t1 missing")
    assert h.index.job(job_id).state is JobState.FAILED
    assert h.index.studies()[0].state == "failed"
    # The missing series comes after all: the study runs without its optional role.
    h.send("T1")
    h.settle(time.time() + 63)
    (_, (_, state, _)) = h.study_jobs()
    assert state == "running"
    assert [r.series_instance_uid is None for r in h.pool.submitted[-1].roles] == [
        False,
        False,
        True,
    ]


def test_an_urgent_job_is_claimed_before_queued_normal_ones(h: StudyHarness) -> None:
    h.pool.size = 0  # every worker busy
    normal = [h.send("BODY") for _ in range(3)]
    h.send("T1C", calling="ED_CT")
    h.send("T1")
    h.settle(time.time() + 2)
    h.scheduler.step(time.time() + 61)  # the deadline: runs without FLAIR
    queued = h.index.jobs(JobState.PENDING)
    assert len(queued) == 4 and queued[-1].study_instance_uid == h.study_uid
    assert queued[-1].priority == 1 and {j.priority for j in queued[:3]} == {0}
    h.pool.size = 1
    h.scheduler.step(time.time() + 62)
    (spec,) = h.pool.submitted
    assert spec.result_key is not None and spec.series_instance_uid not in normal


def test_max_concurrent_holds_a_model_back(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    try:
        association = index.open_association("S", "A", "1.1.1.1")
        for n in range(3):
            ds = next(iter(phantom_ct_datasets(PhantomSpec(slices=1, rows=4, columns=4))))
            index.add_instance(
                InstanceRecord(
                    ds.SOPInstanceUID,
                    ds.SOPClassUID,
                    ds.SeriesInstanceUID,
                    ds.StudyInstanceUID,
                    "CT",
                    tmp_path / f"{n}.dcm",
                    association,
                )
            )
            from dicom_ai.store.index import RunPlan

            model = "gpu" if n < 2 else "cpu"
            index.start_run(ds.SeriesInstanceUID, [RunPlan("r", model, ("pacs",))], "note")
        claimed = index.claim_pending_jobs(3, {"gpu": 1})
        assert [j.model for j in claimed] == ["gpu", "cpu"]
        assert index.claim_pending_jobs(3, {"gpu": 1}) == []
        # The stored inputs of a series job stay empty.
        assert json.loads("[]") == list(claimed[0].roles)
    finally:
        index.close()


def test_rules_test_and_status_show_roles_found_missing_and_the_deadline(
    h: StudyHarness, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from dicom_ai.cli import app

    h.send("T1C")
    h.send("T1C")  # a second candidate: the tie-break is shown
    h.settle(time.time() + 2)
    runner = CliRunner()
    result = runner.invoke(
        app, ["rules", "test", str(tmp_path / "rules.yaml"), str(tmp_path / "spool")]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"study {h.study_uid}, rule tumour (model ct-body):" in text
    assert "missing: t1 (required), flair (optional)" in text
    assert "at the deadline, 60 s after the study's first instance, it fails" in text
    assert "role t1c: 2 series fit" in text
    config = tmp_path / "node.yaml"
    config.write_text(
        f"node: {{data_dir: {tmp_path}, port: 0}}\nrules: {tmp_path / 'rules.yaml'}\n"
    )
    status = runner.invoke(app, ["status", "--config", str(config)])
    assert status.exit_code == 0, status.output
    line = " ".join(status.output.split())
    assert f"study {h.study_uid} (rule tumour, waiting, 2 series" in line
    assert "waiting for t1 (required), flair (optional)" in line


def test_a_study_job_failed_for_a_missing_role_is_not_rerun(h: StudyHarness) -> None:
    h.send("T1C")
    h.settle(time.time() + 2)
    h.scheduler.step(time.time() + 61)
    ((job_id, state, _),) = h.study_jobs()
    assert state == "failed"
    assert h.index.rerun_job(job_id) is False
