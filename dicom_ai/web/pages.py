"""The console's pages, server-rendered with Jinja2 (templates/), no JavaScript build step.

Each route translates HTTP to `Console` calls, as ``api.py`` does; validation, permissions
and the audit log are there. What the pages add:

- logging in: ``POST /login`` sets the session cookie (HttpOnly, SameSite=Strict, Secure
  under HTTPS). The login form carries a token that must match a SameSite=Strict cookie
  set with the form, so another site cannot log a browser in to an account of its choosing.
- forms: every form posts the session's CSRF token (field ``csrf_token``, checked by
  `actor`). An action redirects (303) back with a fixed word (``?done=rerun``), never with
  data; a check, test, replay or C-ECHO renders its result.
- live parts: an element with ``data-live="/fragments/..."`` is refreshed by
  ``static/console.js`` every 2 s from a fragment route that renders the same partial
  template as the page. The series fragment leaves the patient out (no audit entry per
  refresh); the page shows the patient once, to a role that may see it.
- errors: `render_error` renders a console error as a page with its status (401 was
  already turned into a redirect to /login by ``app.py``).
"""

from __future__ import annotations

import hmac
import re
import secrets
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from dicom_ai import __version__
from dicom_ai.errors import BadRequest, RequestError, TooManyRequests
from dicom_ai.web.accounts import Role, may
from dicom_ai.web.api import studies_of
from dicom_ai.web.app import SESSION_COOKIE, actor, console_of, session_of
from dicom_ai.web.console import MAX_UPLOAD, Actor, Console
from dicom_ai.web.views import STUDY_STATES

__all__ = ["install"]

_HERE = Path(__file__).parent
LOGIN_COOKIE = "dicom_ai_login"  # the login form's token (double submit), before a session
LIVE_SECONDS = 2
PER_PAGE = 50
INSTANCES_SHOWN = 200

# (path, title, permission): the nav bar shows what the role may use.
NAV = (
    ("/", "Dashboard", "read"),
    ("/series", "Series", "read"),
    ("/studies", "Studies", "read"),
    ("/failures", "Failures", "read"),
    ("/rules", "Rules", "read"),
    ("/models", "Models", "read"),
    ("/destinations", "Destinations", "read"),
    ("/users", "Users", "admin"),
    ("/audit", "Audit log", "admin"),
)

# ?done=WORD after an action: fixed words, so nothing a link carries is shown back.
DONE = {
    "rerun": "The job is queued to run again.",
    "resubmit": "The delivery is queued to go out again.",
    "discard": "The delivery is given up; its results may now be purged.",
    "user-added": "The user was added.",
    "user-removed": "The user was removed.",
    "logout": "You are logged out.",
}

# Where an action may send the browser back to (a form's ``back`` field); fullmatch.
_BACK = re.compile(r"/(failures|series/[0-9.]{1,64})")


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "—"
    return datetime.fromtimestamp(float(epoch)).strftime("%Y-%m-%d %H:%M:%S")


def _hour(epoch: float) -> str:
    return datetime.fromtimestamp(float(epoch)).strftime("%H:00")


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    value = float(value)
    if value < 10:
        return f"{value:.2f} s"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def _until(seconds: float) -> str:
    """A deadline ``seconds`` away: "in 42 s", "in 9 min", or "passed"."""
    if seconds <= 0:
        return "passed"
    if seconds < 120:
        return f"in {seconds:.0f} s"
    return f"in {seconds / 60:.0f} min"


_NOTE_DEADLINE = re.compile(r"; deadline in -?[0-9]+ s$")


def _study_note(note: str) -> str:
    """A study's note without the seconds to its deadline as they were when it was
    written (the deadline column counts them now)."""
    return _NOTE_DEADLINE.sub("", note)


def _size(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover


def _uid_name(value: str) -> str:
    """A SOP class's name (CT Image Storage) where pydicom knows it, else the UID."""
    from pydicom.uid import UID

    try:
        name = str(UID(value).name)
    except (TypeError, ValueError):
        return value
    return name or value


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(_HERE / "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        when=_when,
        hour=_hour,
        seconds=_seconds,
        until=_until,
        study_note=_study_note,
        size=_size,
        uid_name=_uid_name,
    )
    env.globals.update(version=__version__, live_ms=LIVE_SECONDS * 1000)
    return env


templates = Jinja2Templates(env=_environment())
router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)

Who = Annotated[Actor, Depends(actor)]


def _console(request: Request) -> Console:
    return console_of(request)


Svc = Annotated[Console, Depends(_console)]


def _csrf(request: Request) -> str:
    session = getattr(request.state, "session", None)
    return str(session.csrf_token) if session is not None else ""


def _base(request: Request, role: Role | None, user: str | None, csrf: str) -> dict[str, Any]:
    def allowed(permission: str) -> bool:
        return role is not None and may(role, permission)

    done = request.query_params.get("done", "")
    return {
        "user": user,
        "role": role.value if role is not None else None,
        "may": allowed,
        "csrf": csrf,
        "nav": [(path, title) for path, title, permission in NAV if allowed(permission)],
        "here": request.url.path,
        "flash": DONE.get(done),
    }


def _page(
    request: Request, who: Actor, template: str, status: int = 200, **context: Any
) -> HTMLResponse:
    full = _base(request, who.user.role, who.user.name, _csrf(request))
    full.update(context)
    return templates.TemplateResponse(request, template, full, status_code=status)


def _fragment(request: Request, who: Actor, template: str, **context: Any) -> HTMLResponse:
    return _page(request, who, template, **context)


def _back(value: str, default: str) -> str:
    return value if _BACK.fullmatch(value) else default


def _see(url: str, done: str | None = None) -> RedirectResponse:
    return RedirectResponse(f"{url}?done={done}" if done else url, status_code=303)


# -- logging in ------------------------------------------------------------------------------


def _local(target: str | None) -> str:
    """``target`` when it is a path of this console (``/series?page=2``), else ``/``: a
    login link must not send anyone elsewhere."""
    if not target or len(target) > 1024 or not target.startswith("/"):
        return "/"
    if target.startswith(("//", "/login", "/logout")):
        return "/"
    # No backslash, space or control character: browsers drop tabs and newlines from a URL
    # ("/\t/evil" becomes "//evil") and read "\" as "/".
    if any(c == "\\" or c <= " " or c == "\x7f" for c in target):
        return "/"
    return target


def _login_page(
    request: Request,
    status: int = 200,
    error: str | None = None,
    name: str = "",
    next_page: str = "/",
) -> HTMLResponse:
    token = secrets.token_urlsafe(32)
    context = _base(request, None, None, "")
    context.update(login_token=token, error=error, name=name, next_page=_local(next_page))
    response = templates.TemplateResponse(request, "login.html", context, status_code=status)
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        max_age=3600,
        path="/login",
        httponly=True,
        samesite="strict",
        secure=bool(request.app.state.secure_cookies),
    )
    return response


@router.get("/login")
def login_form(request: Request, next: str = "/") -> Response:
    if session_of(request) is not None:
        return _see(_local(next))
    return _login_page(request, next_page=next)


@router.post("/login")
def login(
    request: Request,
    svc: Svc,
    user: Annotated[str, Form(max_length=256)] = "",
    password: Annotated[str, Form(max_length=4096)] = "",
    login_token: Annotated[str, Form(max_length=128)] = "",
    next_page: Annotated[str, Form(max_length=1024)] = "/",
) -> Response:
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(expected.encode(), login_token.encode()):
        return _login_page(
            request, 403, "The login form expired; please try again.", user, next_page
        )
    address = request.client.host if request.client else ""
    try:
        session_id, session = svc.login(user, password, address)
    except TooManyRequests as exc:
        return _login_page(request, exc.status, str(exc), user, next_page)
    except RequestError:
        return _login_page(request, 401, "Wrong user name or password.", user, next_page)
    response = RedirectResponse(_local(next_page), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=max(1, int(session.expires_at - time.time())),
        path="/",
        httponly=True,
        samesite="strict",
        secure=bool(request.app.state.secure_cookies),
    )
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout")
def logout(request: Request, who: Who, svc: Svc) -> Response:
    svc.logout(request.cookies.get(SESSION_COOKIE, ""), who)
    response = _see("/login", "logout")
    response.delete_cookie(
        SESSION_COOKIE,
        path="/",
        httponly=True,
        samesite="strict",
        secure=bool(request.app.state.secure_cookies),
    )
    return response


# -- dashboard -------------------------------------------------------------------------------


def _chart(per_hour: list[dict[str, Any]]) -> dict[str, Any]:
    """An SVG bar chart's geometry (attributes, not styles: the CSP allows no inline style)."""
    width, height, gap = 50, 120, 10  # viewBox units; drawn at the card's width
    top = max([int(h["instances"]) for h in per_hour] + [1])
    bars = []
    for n, hour in enumerate(per_hour):
        count = int(hour["instances"])
        tall = round(height * count / top) if count else 0
        bars.append(
            {
                "x": n * width + gap // 2,
                "y": height - tall,
                "width": width - gap,
                "height": tall,
                "count": count,
                "hour": hour["hour"],
                "label": n % 2 == 1,
                "label_x": n * width + width // 2,
            }
        )
    return {"bars": bars, "width": width * len(per_hour), "height": height, "top": top}


def _dashboard(svc: Console, who: Actor) -> dict[str, Any]:
    data = svc.dashboard(who)
    disk = data["disk"]
    total = max(1, int(disk["total_bytes"]))
    return {
        "d": data,
        "received": sum(int(h["instances"]) for h in data["received_per_hour"]),
        "chart": _chart(data["received_per_hour"]),
        "disk_used_percent": round(100 * (total - int(disk["free_bytes"])) / total),
    }


@router.get("/")
def dashboard(request: Request, who: Who, svc: Svc) -> Response:
    return _page(request, who, "dashboard.html", **_dashboard(svc, who))


@router.get("/fragments/dashboard")
def dashboard_fragment(request: Request, who: Who, svc: Svc) -> Response:
    return _fragment(request, who, "_dashboard.html", **_dashboard(svc, who))


# -- series ----------------------------------------------------------------------------------


def _series_list(
    request: Request,
    svc: Console,
    who: Actor,
    state: str | None,
    modality: str | None,
    since: str | None,
    page: int,
) -> dict[str, Any]:
    found = svc.series_page(who, state, modality, since, page, PER_PAGE).as_json()
    filters = {k: v for k, v in (("state", state), ("modality", modality), ("since", since)) if v}

    def link(n: int) -> str:
        return "/series?" + urlencode({**filters, "page": n})

    return {
        "found": found,
        "filters": {"state": state or "", "modality": modality or "", "since": since or ""},
        "previous": link(page - 1) if page > 1 else None,
        "next": link(page + 1) if page < found["pages"] else None,
        "live": "/fragments/series?" + urlencode({**filters, "page": page}),
    }


@router.get("/series")
def series_list(
    request: Request,
    who: Who,
    svc: Svc,
    state: str | None = None,
    modality: str | None = None,
    since: str | None = None,
    page: int = 1,
) -> Response:
    context = _series_list(request, svc, who, state, modality, since, page)
    return _page(request, who, "series_list.html", **context)


@router.get("/fragments/series")
def series_list_fragment(
    request: Request,
    who: Who,
    svc: Svc,
    state: str | None = None,
    modality: str | None = None,
    since: str | None = None,
    page: int = 1,
) -> Response:
    context = _series_list(request, svc, who, state, modality, since, page)
    return _fragment(request, who, "_series_list.html", **context)


@router.get("/series/{series_uid}")
def series_detail(series_uid: str, request: Request, who: Who, svc: Svc) -> Response:
    found = svc.series(who, series_uid)
    return _page(
        request,
        who,
        "series.html",
        s=found,
        instances=found["instance_list"][:INSTANCES_SHOWN],
        shown=INSTANCES_SHOWN,
    )


@router.get("/fragments/series/{series_uid}")
def series_fragment(series_uid: str, request: Request, who: Who, svc: Svc) -> Response:
    found = svc.series(who, series_uid, patient=False)
    return _fragment(request, who, "_series.html", s=found)


# -- studies: study rules' studies -----------------------------------------------------------


def _studies(svc: Console, who: Actor, state: str | None, page: int) -> dict[str, Any]:
    found = studies_of(svc, who, state, page, PER_PAGE).as_json()
    filters = {"state": state} if state else {}

    def link(n: int) -> str:
        return "/studies?" + urlencode({**filters, "page": n})

    return {
        "found": found,
        "states": STUDY_STATES,
        "filters": {"state": state or ""},
        "previous": link(page - 1) if page > 1 else None,
        "next": link(page + 1) if page < found["pages"] else None,
        "live": "/fragments/studies?" + urlencode({**filters, "page": page}),
    }


@router.get("/studies")
def studies(
    request: Request, who: Who, svc: Svc, state: str | None = None, page: int = 1
) -> Response:
    return _page(request, who, "studies.html", **_studies(svc, who, state, page))


@router.get("/fragments/studies")
def studies_fragment(
    request: Request, who: Who, svc: Svc, state: str | None = None, page: int = 1
) -> Response:
    return _fragment(request, who, "_studies.html", **_studies(svc, who, state, page))


# -- failures: failed jobs and dead letters --------------------------------------------------


def _failures(svc: Console, who: Actor, jobs_page: int, dead_page: int) -> dict[str, Any]:
    jobs = svc.jobs_page(who, "failed", jobs_page, PER_PAGE).as_json()
    dead = svc.deliveries_page(who, "dead_letter", dead_page, PER_PAGE).as_json()

    def link(j: int, d: int) -> str:
        return "/failures?" + urlencode({"jobs_page": j, "dead_page": d})

    return {
        "jobs": jobs,
        "dead": dead,
        "jobs_previous": link(jobs_page - 1, dead_page) if jobs_page > 1 else None,
        "jobs_next": link(jobs_page + 1, dead_page) if jobs_page < jobs["pages"] else None,
        "dead_previous": link(jobs_page, dead_page - 1) if dead_page > 1 else None,
        "dead_next": link(jobs_page, dead_page + 1) if dead_page < dead["pages"] else None,
        "live": "/fragments/failures?"
        + urlencode({"jobs_page": jobs_page, "dead_page": dead_page}),
    }


@router.get("/failures")
def failures(
    request: Request, who: Who, svc: Svc, jobs_page: int = 1, dead_page: int = 1
) -> Response:
    return _page(request, who, "failures.html", **_failures(svc, who, jobs_page, dead_page))


@router.get("/fragments/failures")
def failures_fragment(
    request: Request, who: Who, svc: Svc, jobs_page: int = 1, dead_page: int = 1
) -> Response:
    return _fragment(request, who, "_failures.html", **_failures(svc, who, jobs_page, dead_page))


@router.post("/jobs/{job_id}/rerun")
def rerun(
    job_id: int, who: Who, svc: Svc, back: Annotated[str, Form(max_length=100)] = ""
) -> Response:
    svc.rerun(who, job_id)
    return _see(_back(back, "/failures"), "rerun")


@router.post("/deliveries/{delivery_id}/resubmit")
def resubmit(
    delivery_id: int, who: Who, svc: Svc, back: Annotated[str, Form(max_length=100)] = ""
) -> Response:
    svc.resubmit(who, delivery_id)
    return _see(_back(back, "/failures"), "resubmit")


@router.post("/deliveries/{delivery_id}/discard")
def discard(
    delivery_id: int, who: Who, svc: Svc, back: Annotated[str, Form(max_length=100)] = ""
) -> Response:
    svc.discard(who, delivery_id)
    return _see(_back(back, "/failures"), "discard")


# -- rules -----------------------------------------------------------------------------------


def _rules_page(
    request: Request,
    who: Actor,
    svc: Console,
    status: int = 200,
    candidate: str | None = None,
    **results: Any,
) -> HTMLResponse:
    running = svc.rules(who)
    context: dict[str, Any] = {
        "running": running,
        "called_aes": [r["called_ae"] for r in running],
        "candidate": candidate
        if candidate is not None
        else (running[0]["text"] if running else ""),
        "count": 100,
        "series_uid": "",
        "calling_ae": "SCANNER",
        "error": None,
        "error_of": None,
        "check": None,
        "test": None,
        "replay": None,
    }
    context.update(results)
    return _page(request, who, "rules.html", status, **context)


@router.get("/rules")
def rules(request: Request, who: Who, svc: Svc) -> Response:
    return _rules_page(request, who, svc)


@router.post("/rules/check")
def rules_check(
    request: Request, who: Who, svc: Svc, text: Annotated[str, Form()] = ""
) -> Response:
    try:
        result = svc.check_rules(who, text)
    except RequestError as exc:
        return _rules_page(request, who, svc, exc.status, text, error=str(exc), error_of="check")
    return _rules_page(request, who, svc, candidate=text, check=result)


@router.post("/rules/test")
async def rules_test(
    request: Request,
    who: Who,
    svc: Svc,
    file: Annotated[UploadFile | None, File()] = None,
    series_instance_uid: Annotated[str, Form(max_length=100)] = "",
    calling_ae: Annotated[str, Form(max_length=64)] = "SCANNER",
    called_ae: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    uid = series_instance_uid.strip()
    try:
        upload = None
        if file is not None and file.filename:
            upload = await file.read(MAX_UPLOAD + 1)
            if not upload:
                raise BadRequest("the uploaded file is empty")
        result = svc.test_rules(
            who,
            upload=upload,
            series_uid=None if upload is not None else (uid or None),
            calling_ae=calling_ae,
            called_ae=called_ae or None,
        )
    except RequestError as exc:
        return _rules_page(
            request,
            who,
            svc,
            exc.status,
            error=str(exc),
            error_of="test",
            series_uid=uid,
            calling_ae=calling_ae,
        )
    source = "the uploaded file" if upload is not None else f"series {uid}"
    return _rules_page(
        request, who, svc, test=result, test_source=source, series_uid=uid, calling_ae=calling_ae
    )


@router.post("/rules/replay")
def rules_replay(
    request: Request,
    who: Who,
    svc: Svc,
    text: Annotated[str, Form()] = "",
    count: Annotated[int, Form()] = 100,
    called_ae: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    try:
        result = svc.replay(who, text, count, called_ae or None)
    except RequestError as exc:
        return _rules_page(
            request, who, svc, exc.status, text, error=str(exc), error_of="replay", count=count
        )
    return _rules_page(request, who, svc, candidate=text, replay=result, count=count)


# -- models, destinations --------------------------------------------------------------------


@router.get("/models")
def models(request: Request, who: Who, svc: Svc) -> Response:
    return _page(request, who, "models.html", models=svc.models(who))


@router.get("/destinations")
def destinations(request: Request, who: Who, svc: Svc) -> Response:
    return _page(request, who, "destinations.html", destinations=svc.destinations(who), echo=None)


@router.post("/destinations/{name}/echo")
def echo(name: str, request: Request, who: Who, svc: Svc) -> Response:
    result = svc.echo(who, name)
    return _page(request, who, "destinations.html", destinations=svc.destinations(who), echo=result)


# -- users and the audit log -----------------------------------------------------------------


def _users_page(
    request: Request, who: Actor, svc: Console, status: int = 200, **context: Any
) -> HTMLResponse:
    full: dict[str, Any] = {"roles": [r.value for r in Role], "error": None, "name": ""}
    full.update(context)
    return _page(request, who, "users.html", status, users=svc.users(who), **full)


@router.get("/users")
def users(request: Request, who: Who, svc: Svc) -> Response:
    return _users_page(request, who, svc)


@router.post("/users")
def add_user(
    request: Request,
    who: Who,
    svc: Svc,
    name: Annotated[str, Form(max_length=64)] = "",
    role: Annotated[str, Form(max_length=16)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
) -> Response:
    try:
        svc.add_user(who, name, role, password)
    except RequestError as exc:
        if exc.status == 403:
            raise
        return _users_page(request, who, svc, exc.status, error=str(exc), name=name)
    return _see("/users", "user-added")


@router.post("/users/{name}/remove")
def remove_user(name: str, who: Who, svc: Svc) -> Response:
    svc.remove_user(who, name)
    return _see("/users", "user-removed")


@router.get("/audit")
def audit(request: Request, who: Who, svc: Svc, limit: int = 200) -> Response:
    return _page(request, who, "audit.html", entries=svc.audit(who, limit), limit=limit)


# -- installing ------------------------------------------------------------------------------


def _render_error(request: Request, status: int, detail: str) -> Response:
    """A console error as a page (``app.state.render_error``); never raises."""
    try:
        session = session_of(request)
    except Exception:  # the accounts database itself failing: still answer
        session = None
    if session is not None:
        context = _base(request, session.user.role, session.user.name, session.csrf_token)
    else:
        context = _base(request, None, None, "")
    context.update(status=status, detail=detail)
    return templates.TemplateResponse(request, "error.html", context, status_code=status)


def install(app: FastAPI) -> None:
    """Add the pages' routes to ``app`` and its error page renderer."""
    app.include_router(router)
    render: Callable[[Request, int, str], Response] = _render_error
    app.state.render_error = render
