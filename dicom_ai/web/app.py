"""The console's ASGI application (FastAPI): security, authentication, error mapping.

Routes live in ``api.py`` (the REST API under /api/v1) and ``pages.py`` (server-rendered
pages); this module holds what every route shares:

- who asks (`actor`): ``Authorization: Bearer TOKEN``, else the session cookie; for a
  session, every unsafe request carries the session's CSRF token (form field
  ``csrf_token`` or header ``X-CSRF-Token``). Bearer requests carry no cookie, so need none.
- errors: `RequestError` becomes its HTTP status with ``{"detail": message}`` (a page
  shows the message); a parameter FastAPI cannot parse is a 400 naming it; anything else is
  a 500 with no traceback in the answer.
- security headers on every answer (CSP without inline script, frame-ancestors 'none').
- request bodies: at most ``MAX_BODY`` (a DICOM upload: ``MAX_UPLOAD`` more), refused
  with 413 as they arrive. A route reads its body before `actor` runs, so without a limit
  a client that never logged in could make the console hold any amount.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicom_ai import __version__
from dicom_ai.config import Config
from dicom_ai.errors import Forbidden, NotAuthenticated, RequestError
from dicom_ai.web.accounts import Accounts, Session
from dicom_ai.web.console import MAX_UPLOAD, Actor, Console

__all__ = ["MAX_BODY", "SESSION_COOKIE", "actor", "console_of", "create_app", "session_of"]

log = logging.getLogger(__name__)

SESSION_COOKIE = "dicom_ai_session"
MAX_BODY = 4 << 20  # a form or JSON body (rules text: at most 1 MiB, encoded)
_UPLOADS = frozenset({"/rules/test", "/api/v1/rules/test"})  # these take a DICOM file
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
_HERE = Path(__file__).parent
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def _address(request: Request) -> str:
    return request.client.host if request.client else ""


def session_of(request: Request) -> Session | None:
    """The browser session of the request, if it has a valid one."""
    session_id = request.cookies.get(SESSION_COOKIE)
    if not session_id or len(session_id) > 128:
        return None
    return console_of(request).accounts.session(session_id)


async def actor(request: Request) -> Actor:
    """Who asks (FastAPI dependency); raises NotAuthenticated, or Forbidden for a session
    request without its CSRF token."""
    console = console_of(request)
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthenticated("use Authorization: Bearer TOKEN")
        user = console.accounts.token_user(token.strip())
        if user is None:
            raise NotAuthenticated("unknown or revoked token")
        return Actor(user, _address(request))
    session = session_of(request)
    if session is None:
        raise NotAuthenticated("log in, or send Authorization: Bearer TOKEN")
    if request.method not in _SAFE:
        sent = request.headers.get("x-csrf-token")
        if sent is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")
        ):
            form = await request.form()
            field = form.get("csrf_token")
            sent = field if isinstance(field, str) else None
        if sent is None or not hmac.compare_digest(sent.encode(), session.csrf_token.encode()):
            raise Forbidden("missing or wrong CSRF token; reload the page")
    request.state.session = session
    return Actor(session.user, _address(request))


class _BodyLimit:
    """Refuses a request body over its route's limit: at once when its declared length is,
    else when the bytes received pass it. The 413 is raised where the route reads the
    body, so it is answered as any other error (a page, or JSON)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = MAX_BODY + (MAX_UPLOAD if scope["path"] in _UPLOADS else 0)
        declared = Headers(scope=scope).get("content-length", "")
        received = 0

        async def limited() -> Message:
            nonlocal received
            if declared.isdigit() and int(declared) > limit:
                raise StarletteHTTPException(413, _too_large(limit))
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise StarletteHTTPException(413, _too_large(limit))
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit >> 20} MiB"


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith(("/api/", "/metrics", "/healthz")) and (
        "text/html" in request.headers.get("accept", "")
    )


def _error(request: Request, status: int, detail: str) -> Response:
    if _wants_html(request):
        if status == 401:  # back to the page asked for, once logged in
            wanted = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            asked = request.method == "GET" and wanted != "/"
            target = f"/login?{urlencode({'next': wanted})}" if asked else "/login"
            return RedirectResponse(target, status_code=303)
        render: Callable[[Request, int, str], Response] | None = getattr(
            request.app.state, "render_error", None
        )
        if render is not None:
            return render(request, status, detail)
        return PlainTextResponse(detail, status_code=status)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_app(config: Config, accounts: Accounts | None = None) -> FastAPI:
    """The console for ``config``: its own accounts database unless one is given."""
    from dicom_ai.web import api, pages

    accounts = accounts or Accounts(
        config.node.data_dir / "console.sqlite3", config.web.session_hours * 3600
    )
    app = FastAPI(
        title="dicom-ai",
        version=__version__,
        openapi_url="/api/v1/openapi.json",
        docs_url=None,  # Swagger UI loads scripts from a CDN; the JSON is what scripts need
        redoc_url=None,
    )
    app.state.console = Console(config, accounts)
    app.state.secure_cookies = config.web.tls is not None
    app.include_router(api.router)
    pages.install(app)
    static = _HERE / "static"
    if static.is_dir():
        app.mount("/static", StaticFiles(directory=static), name="static")
    app.add_middleware(_BodyLimit)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> Response:
        return _error(request, exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ())[1:]) or "request"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        return _error(request, 400, "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(request, exc.status_code, str(exc.detail))

    @app.middleware("http")
    async def _headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        try:
            response = await call_next(request)
        except Exception as exc:  # a bug: the answer says so, without a traceback
            log.error(
                "console: %s %s failed: %s: %s",
                request.method,
                request.url.path,
                type(exc).__name__,
                exc,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            response = _error(request, 500, "internal error; the node's log has the cause")
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        if app.state.secure_cookies:
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return response

    @app.get("/healthz", include_in_schema=False)
    def healthz(request: Request) -> dict[str, Any]:
        return console_of(request).health()

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        token = config.web.metrics_token
        if token is not None:
            import hmac

            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                raise NotAuthenticated("/metrics needs Authorization: Bearer <web.metrics_token>")
        from dicom_ai.web.metrics import render

        console = console_of(request)
        body, content_type = render(console.index, console.spool_dir)
        return Response(body, media_type=content_type)

    return app
