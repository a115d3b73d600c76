"""The REST API under /api/v1 (OpenAPI at /api/v1/openapi.json). Each route translates
HTTP to one `Console` call; validation, permissions and the audit log are there."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from pydantic import BaseModel, Field

from dicom_ai.errors import BadRequest
from dicom_ai.web.app import actor, console_of
from dicom_ai.web.console import MAX_UPLOAD, Actor, Console, page_args
from dicom_ai.web.views import Page as ViewPage
from dicom_ai.web.views import study_state

__all__ = ["router", "studies_of"]

router = APIRouter(prefix="/api/v1")

Who = Annotated[Actor, Depends(actor)]
Page = Annotated[int, Query(description="1, 2, ...")]
PerPage = Annotated[int, Query(description="items per page, at most 500")]


def _console(request: Request) -> Console:
    return console_of(request)


Svc = Annotated[Console, Depends(_console)]


class RulesText(BaseModel):
    text: str = Field(description="a rules file (YAML)")


class ReplayRequest(RulesText):
    count: int = Field(default=100, description="the last N series received")
    called_ae: str | None = None


class NewUser(BaseModel):
    name: str
    role: str
    password: str


@router.get("/series")
def list_series(
    who: Who,
    svc: Svc,
    state: str | None = None,
    modality: str | None = None,
    since: Annotated[str | None, Query(description="epoch seconds or ISO 8601")] = None,
    page: Page = 1,
    per_page: PerPage = 50,
) -> dict[str, Any]:
    return svc.series_page(who, state, modality, since, page, per_page).as_json()


@router.get("/series/{series_uid}")
def get_series(series_uid: str, who: Who, svc: Svc) -> dict[str, Any]:
    return svc.series(who, series_uid)


@router.get("/jobs")
def list_jobs(
    who: Who, svc: Svc, state: str | None = None, page: Page = 1, per_page: PerPage = 50
) -> dict[str, Any]:
    return svc.jobs_page(who, state, page, per_page).as_json()


@router.get("/studies")
def list_studies(
    who: Who,
    svc: Svc,
    state: Annotated[
        str | None, Query(description="waiting, overdue, started, failed or dropped")
    ] = None,
    page: Page = 1,
    per_page: PerPage = 50,
) -> dict[str, Any]:
    """Studies of study rules, newest first: roles found and missing, the deadline, the
    study's series and jobs."""
    return studies_of(svc, who, state, page, per_page).as_json()


def studies_of(svc: Console, who: Actor, state: str | None, page: int, per_page: int) -> ViewPage:
    """`ConsoleView.studies_page` under the running rules files (the roles each study rule
    asks for), for a role that may read; the pages call it too."""
    who.require("read")
    parsed = study_state(state)
    files = {title: called.rules for title, called in svc.config.called_ae_table().items()}
    return svc.view.studies_page(parsed, *page_args(page, per_page), rule_files=files)


@router.post("/jobs/{job_id}/rerun")
def rerun_job(job_id: int, who: Who, svc: Svc) -> dict[str, Any]:
    return svc.rerun(who, job_id)


@router.get("/deliveries")
def list_deliveries(
    who: Who, svc: Svc, state: str | None = None, page: Page = 1, per_page: PerPage = 50
) -> dict[str, Any]:
    return svc.deliveries_page(who, state, page, per_page).as_json()


@router.post("/deliveries/{delivery_id}/resubmit")
def resubmit_delivery(delivery_id: int, who: Who, svc: Svc) -> dict[str, Any]:
    return svc.resubmit(who, delivery_id)


@router.post("/deliveries/{delivery_id}/discard")
def discard_delivery(delivery_id: int, who: Who, svc: Svc) -> dict[str, Any]:
    """Give up a dead letter: it is never sent, and its results may then be purged."""
    return svc.discard(who, delivery_id)


@router.get("/destinations")
def list_destinations(who: Who, svc: Svc) -> list[dict[str, Any]]:
    return svc.destinations(who)


@router.post("/destinations/{name}/echo")
def echo_destination(name: str, who: Who, svc: Svc) -> dict[str, Any]:
    return svc.echo(who, name)


@router.get("/models")
def list_models(who: Who, svc: Svc) -> list[dict[str, Any]]:
    return svc.models(who)


@router.get("/rules")
def get_rules(who: Who, svc: Svc) -> list[dict[str, Any]]:
    return svc.rules(who)


@router.post("/rules/check")
def check_rules(body: RulesText, who: Who, svc: Svc) -> dict[str, Any]:
    return svc.check_rules(who, body.text)


@router.post("/rules/test")
async def test_rules(
    who: Who,
    svc: Svc,
    file: Annotated[UploadFile | None, File(description="a DICOM Part 10 file")] = None,
    series_instance_uid: Annotated[str | None, Form()] = None,
    calling_ae: Annotated[str, Form()] = "SCANNER",
    called_ae: Annotated[str | None, Form()] = None,
    source_ip: Annotated[str, Form()] = "127.0.0.1",
) -> dict[str, Any]:
    """The rules' trace for an uploaded file, or for a series the node received."""
    upload = None
    if file is not None:
        upload = await file.read(MAX_UPLOAD + 1)
        if not upload:
            raise BadRequest("the uploaded file is empty")
    return svc.test_rules(
        who,
        upload=upload,
        series_uid=series_instance_uid or None,
        calling_ae=calling_ae,
        called_ae=called_ae or None,
        source_ip=source_ip,
    )


@router.post("/rules/replay")
def replay_rules(body: ReplayRequest, who: Who, svc: Svc) -> dict[str, Any]:
    """Which of the last ``count`` series a candidate rules file would route differently."""
    return svc.replay(who, body.text, body.count, body.called_ae)


@router.get("/dashboard")
def dashboard(who: Who, svc: Svc) -> dict[str, Any]:
    return svc.dashboard(who)


@router.get("/users")
def list_users(who: Who, svc: Svc) -> list[dict[str, Any]]:
    return svc.users(who)


@router.post("/users")
def add_user(body: NewUser, who: Who, svc: Svc) -> dict[str, Any]:
    return svc.add_user(who, body.name, body.role, body.password)


@router.delete("/users/{name}")
def remove_user(name: str, who: Who, svc: Svc) -> dict[str, Any]:
    return svc.remove_user(who, name)


@router.get("/audit")
def audit(who: Who, svc: Svc, limit: int = 200) -> list[dict[str, Any]]:
    return svc.audit(who, limit)
