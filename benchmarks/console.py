"""Console reads with 100,000 series in the index: REST API and pages against a 200 ms target.

    .venv/bin/python -m benchmarks.console [--series 100000] [--instances 3] [--requests 30]
                                           [--explain]

Builds a node's index with --series series of --instances instances each (one association
per series; modalities CT, MR, CR, US, PT, SEG; received over 60 days). The newest 1% are
still pending (with no association link, so the node leaves them so); 90% of the others
have a job (95% done, 4% failed, 1% pending) and each done job a delivery with one attempt
(2% of them dead letters). The rows are bulk-inserted into the schema that `Index` creates
(its migrations), in one transaction. Every instance points at one small real DICOM file,
so the series page reads a patient name as it would.

Then starts the node (`dicom-ai serve`, no rules, console on), adds an admin user and an API
token, logs in through the login form for a session, and times each request over one
kept-alive HTTP connection: 3 warm-ups, then --requests timed ones (time to the last byte
of the response). Prints the median, p95 and max per request beside the 200 ms target
and, for the API's reads, the median of the same `ConsoleView` reads in this process (the
SQL alone: no HTTP, no JSON, not niced).
--explain also prints SQLite's plan for the series list's queries.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs, urlencode

from dicom_ai.store.index import Index
from dicom_ai.store.states import SeriesState
from dicom_ai.synthetic import PhantomSpec, write_phantom_ct
from dicom_ai.web.accounts import Accounts
from dicom_ai.web.views import _SERIES, ConsoleView, SeriesFilter
from tests.peers import NodeProcess, free_port, node_config, port_open, wait_until

TARGET_MS = 200.0
_DAYS = 60
_MODALITIES = ("CT",) * 12 + ("MR",) * 5 + ("CR", "US", "PT", "SEG")
_MODELS = {"CT": "ct-body", "MR": "mr-brain", "CR": "cxr", "PT": "pet-lesions"}
_PASSWORD = "bench-password-0123456789"


def _uid(kind: int, n: int) -> str:
    return f"1.2.826.0.1.3680043.10.999.{kind}.{n + 1}"


def _rows(
    series: int, instances: int, file: Path, now: float
) -> Iterator[tuple[str, list[tuple[object, ...]]]]:
    """(table, rows) in insert order, for ``series`` series received before ``now``."""
    rng = random.Random(1)
    start = now - _DAYS * 86400
    step = _DAYS * 86400 / series
    ct_image = "1.2.840.10008.5.1.4.1.1.2"
    jobs: list[tuple[object, ...]] = []
    deliveries: list[tuple[object, ...]] = []
    attempts: list[tuple[object, ...]] = []
    associations: list[tuple[object, ...]] = []
    instance_rows: list[tuple[object, ...]] = []
    series_rows: list[tuple[object, ...]] = []
    links: list[tuple[object, ...]] = []
    hourly: dict[int, int] = {}
    for n in range(series):
        received = start + n * step + rng.random() * step / 2
        series_uid, study_uid = _uid(1, n), _uid(2, n // 3)
        modality = rng.choice(_MODALITIES)
        association = n + 1
        associations.append(
            (association, "SCANNER", "DICOM_AI", "10.0.0.7", received - 5, received + 1)
        )
        for k in range(instances):
            at = received - (instances - k) * 0.1
            instance_rows.append(
                (
                    _uid(3, n * instances + k),
                    series_uid,
                    study_uid,
                    ct_image,
                    str(file),
                    association,
                    at,
                )
            )
        hourly[int(received // 3600)] = hourly.get(int(received // 3600), 0) + instances
        pending = n >= series - series // 100  # the newest 1% are still being assembled
        routed = not pending
        model = _MODELS.get(modality, "generic")
        has_job = routed and rng.random() < 0.9
        note = None if pending else (f"rule {model}" if has_job else "no rule matched")
        series_rows.append(
            (
                series_uid,
                study_uid,
                modality,
                received - instances * 0.1,
                received,
                0 if routed else 1,
                1 if routed else 0,
                association,
                note,
            )
        )
        if routed:  # a pending series without one stays pending: the node does not route it
            links.append((series_uid, association))
        if not has_job:
            continue
        job_id = len(jobs) + 1
        roll = rng.random()
        state = "done" if roll < 0.95 else ("failed" if roll < 0.99 else "pending")
        started = received + 3.5 if state != "pending" else None
        finished = received + 14 + rng.random() * 6 if state != "pending" else None
        stages = {"load": 0.45, "infer": 8.7, "encode": 1.0} if state == "done" else None
        jobs.append(
            (
                job_id,
                series_uid,
                1,
                model,
                model,
                '["pacs"]',
                state,
                1 if state != "pending" else 0,
                "InferenceError: out of memory" if state == "failed" else None,
                '["/spool/results/seg.dcm", "/spool/results/sr.dcm"]' if state == "done" else None,
                received + 3,
                finished or received + 3,
                started,
                finished,
                json.dumps(stages) if stages else None,
            )
        )
        if state != "done" or finished is None:
            continue
        delivery_id = len(deliveries) + 1
        dead = rng.random() < 0.02
        delivered = None if dead else finished + 0.4
        deliveries.append(
            (
                delivery_id,
                job_id,
                "pacs",
                '["/spool/results/seg.dcm", "/spool/results/sr.dcm"]',
                "dead" if dead else "delivered",
                30 if dead else 1,
                finished,
                "association rejected" if dead else None,
                delivered,
            )
        )
        attempts.append(
            (
                delivery_id,
                finished + 0.4,
                0 if dead else 1,
                "association rejected" if dead else None,
            )
        )
    yield "associations", associations
    yield "instances", instance_rows
    yield "series", series_rows
    yield "series_associations", links
    yield "jobs", jobs
    yield "deliveries", deliveries
    yield "delivery_attempts", attempts
    yield "received_hourly", sorted(hourly.items())


_INSERTS = {
    "associations": "INSERT INTO associations (id, calling_ae, called_ae, source_ip, opened_at,"
    " closed_at) VALUES (?, ?, ?, ?, ?, ?)",
    "instances": "INSERT INTO instances (sop_instance_uid, series_instance_uid,"
    " study_instance_uid, sop_class_uid, path, association_id, received_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)",
    "series": "INSERT INTO series (series_instance_uid, study_instance_uid, modality,"
    " first_received, last_received, dirty, runs, last_association_id, routed_note)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    "series_associations": "INSERT INTO series_associations (series_instance_uid,"
    " association_id) VALUES (?, ?)",
    "jobs": "INSERT INTO jobs (id, series_instance_uid, run, rule, model, destinations, state,"
    " attempts, error, result_files, created_at, updated_at, started_at, finished_at, stages)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    "deliveries": "INSERT INTO deliveries (id, job_id, destination, files, state, attempts,"
    " next_attempt_at, last_error, delivered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    "delivery_attempts": "INSERT INTO delivery_attempts (delivery_id, at, ok, error)"
    " VALUES (?, ?, ?, ?)",
    "received_hourly": "INSERT INTO received_hourly (hour, instances) VALUES (?, ?)",
}


def build_index(path: Path, series: int, instances: int, file: Path) -> dict[str, int]:
    """The index at ``path`` (schema by `Index`), filled; rows per table."""
    Index(path).close()
    counts = {}
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("BEGIN IMMEDIATE")
        for table, rows in _rows(series, instances, file, time.time()):
            db.executemany(_INSERTS[table], rows)
            counts[table] = len(rows)
        db.execute("COMMIT")
        db.execute("ANALYZE")  # as after `PRAGMA optimize`; without it the plans are the same
    finally:
        db.close()
    return counts


def explain(path: Path, series_uid: str) -> None:
    """SQLite's plans for the series list's and the series page's queries."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    shapes = {
        "count, no filter": ("SELECT COUNT(*) FROM series s", ()),
        "count, modality + state": (
            "SELECT COUNT(*) FROM series s WHERE s.dirty = ? AND s.modality = ?",
            (0, "CT"),
        ),
        "page, modality + state": (
            f"{_SERIES} WHERE s.dirty = ? AND s.modality = ? ORDER BY s.last_received DESC"
            " LIMIT 50 OFFSET 0",
            (0, "CT"),
        ),
        "one series": (f"{_SERIES} WHERE s.series_instance_uid = ?", (series_uid,)),
    }
    for name, (sql, args) in shapes.items():
        print(f"-- {name}")
        for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", args):
            print(f"   {row[-1]}")
    db.close()


class Client:
    """One kept-alive HTTP/1.1 connection, as a browser or a script holds one."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self._connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.headers = headers

    def get(self, url: str) -> tuple[int, bytes, http.client.HTTPResponse]:
        try:
            self._connection.request("GET", url, headers=self.headers)
            response = self._connection.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            # The server closes a connection idle for 5 s (uvicorn's keep-alive): reconnect.
            self._connection.close()
            self._connection.request("GET", url, headers=self.headers)
            response = self._connection.getresponse()
        return response.status, response.read(), response

    def post_form(
        self, url: str, fields: dict[str, str], cookie: str
    ) -> tuple[int, http.client.HTTPResponse]:
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie}
        self._connection.request("POST", url, body=urlencode(fields), headers=headers)
        response = self._connection.getresponse()
        response.read()
        return response.status, response

    def close(self) -> None:
        self._connection.close()


def _cookies(response: http.client.HTTPResponse) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    for header in response.headers.get_all("Set-Cookie") or []:
        jar.load(header)
    return {name: morsel.value for name, morsel in jar.items()}


def log_in(port: int, user: str, password: str) -> Client | None:
    """A client with a session cookie, through the login form; None if there is no form."""
    client = Client(port, {})
    status, body, response = client.get("/login")
    field = re.search(rb'name="login_token" value="([^"]+)"', body)
    if status != 200 or field is None:
        client.close()
        return None
    login_cookie = "; ".join(f"{k}={v}" for k, v in _cookies(response).items())
    fields = {"user": user, "password": password, "login_token": field.group(1).decode()}
    status, response = client.post_form("/login", fields, login_cookie)
    session = {k: v for k, v in _cookies(response).items() if v}
    if status != 303 or not session:
        raise RuntimeError(f"login failed: {status}")
    client.headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in session.items())}
    return client


def time_requests(client: Client, url: str, requests: int) -> tuple[list[float], int]:
    """Milliseconds per request after 3 warm-ups, and the response size in bytes."""
    size = 0
    times = []
    for n in range(3 + requests):
        started = time.perf_counter()
        status, body, _ = client.get(url)
        elapsed = (time.perf_counter() - started) * 1000
        if status != 200:
            raise RuntimeError(f"GET {url}: {status}\n{body[:500]!r}")
        size = len(body)
        if n >= 3:
            times.append(elapsed)
    return times, size


def sql_ms(view: ConsoleView, url: str, requests: int) -> float | None:
    """Median milliseconds of the index reads behind an API URL, in this process (no HTTP,
    no JSON); None for other URLs."""
    path, _, query = url.partition("?")
    if path == "/api/v1/series":
        args = {k: v[0] for k, v in parse_qs(query).items()}
        where = SeriesFilter(
            SeriesState(args["state"]) if "state" in args else None, args.get("modality")
        )
        page, per_page = int(args.get("page", 1)), int(args.get("per_page", 50))

        def call() -> object:
            return view.series_page(where, page, per_page)

    elif path.startswith("/api/v1/series/"):

        def call() -> object:
            return view.series(path.rsplit("/", 1)[1])

    else:
        return None
    times = []
    for n in range(3 + requests):
        started = time.perf_counter()
        call()
        if n >= 3:
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _p95(values: Sequence[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--series", type=int, default=100_000)
    parser.add_argument("--instances", type=int, default=3, help="per series")
    parser.add_argument("--requests", type=int, default=30, help="timed requests per URL")
    parser.add_argument("--explain", action="store_true", help="print the query plans")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="dicom-ai-bench-console-"))
    node = None
    try:
        workdir = root / "node"
        spec = PhantomSpec(slices=1, rows=64, columns=64, pixel_spacing_mm=6.25)
        (file,) = write_phantom_ct(root / "ct", spec)
        index_path = workdir / "data" / "index.sqlite3"
        started = time.perf_counter()
        counts = build_index(index_path, args.series, args.instances, file)
        built = time.perf_counter() - started
        size = index_path.stat().st_size / 1e6
        print(
            f"index: {', '.join(f'{n} {t}' for t, n in counts.items())}; "
            f"{size:.0f} MB, built in {built:.1f} s"
        )
        uid = _uid(1, args.series // 2)  # a routed series with a job and a delivery
        if args.explain:
            explain(index_path, uid)

        rules = root / "rules.yaml"
        rules.write_text("rules: []\n")
        web_port = free_port()
        config = node_config(
            workdir,
            free_port(),
            rules=rules,
            web={"enabled": True, "host": "127.0.0.1", "port": web_port},
        )
        accounts = Accounts(workdir / "data" / "console.sqlite3")
        accounts.add_user("bench", "admin", _PASSWORD)
        token = accounts.new_token("bench")
        accounts.close()
        started = time.perf_counter()
        node = NodeProcess(workdir, config).start(timeout=300)
        wait_until(lambda: port_open(web_port), 60, "the console to listen")
        print(f"node and console up in {time.perf_counter() - started:.1f} s")

        api = Client(web_port, {"Authorization": f"Bearer {token}"})
        browser = log_in(web_port, "bench", _PASSWORD)
        (total,) = (json.loads(api.get("/api/v1/series?per_page=1")[1])["total"],)
        middle = max(1, -(-total // 50) // 2)
        checks: list[tuple[str, Client | None, str]] = [
            ("API list, page 1", api, "/api/v1/series?page=1&per_page=50"),
            (f"API list, page {middle}", api, f"/api/v1/series?page={middle}&per_page=50"),
            ("API list, modality=CT", api, "/api/v1/series?modality=CT&page=1&per_page=50"),
            ("API list, state=routed", api, "/api/v1/series?state=routed&page=1&per_page=50"),
            (
                "API list, CT + routed, mid",
                api,
                f"/api/v1/series?modality=CT&state=routed&page={middle // 2}&per_page=50",
            ),
            ("API list, CT + pending", api, "/api/v1/series?modality=CT&state=pending&page=1"),
            # Fewer matches than a page: the walk down series_last_received reads every row.
            ("API list, SEG + pending", api, "/api/v1/series?modality=SEG&state=pending&page=1"),
            ("API list, modality=MG (none)", api, "/api/v1/series?modality=MG&page=1"),
            ("API one series", api, f"/api/v1/series/{uid}"),
            ("page /series", browser, "/series"),
            (f"page /series?page={middle}", browser, f"/series?page={middle}"),
            ("page /series CT + routed", browser, "/series?modality=CT&state=routed"),
            ("page live /fragments/series", browser, "/fragments/series?page=1"),
            ("page /series/{uid}", browser, f"/series/{uid}"),
            ("page / (dashboard)", browser, "/"),
            ("/metrics", api, "/metrics"),
            ("/healthz", api, "/healthz"),
        ]
        print(
            f"{total} series in the index; {args.requests} timed requests per URL after 3 "
            f"warm-ups, one kept-alive connection; target {TARGET_MS:.0f} ms"
        )
        print(
            f"{'request':<30} {'median ms':>9} {'p95 ms':>8} {'max ms':>8} {'KB':>6} "
            f"{'verdict':<7}  {'SQL alone, median ms':>20}"
        )
        view = ConsoleView(index_path)
        floor = float("inf")
        for name, client, url in checks:
            if client is None:
                print(f"{name:<30} {'(no login form: not timed)':>34}")
                continue
            times, size = time_requests(client, url, args.requests)
            median, p95 = statistics.median(times), _p95(times)
            floor = min(floor, min(times))
            verdict = "ok" if p95 <= TARGET_MS else "OVER"
            sql = sql_ms(view, url, args.requests)
            print(
                f"{name:<30} {median:>9.1f} {p95:>8.1f} {max(times):>8.1f} "
                f"{size / 1024:>6.1f} {verdict:<7}  {'' if sql is None else f'{sql:.1f}':>20}"
            )
        view.close()
        if floor >= 38:
            print(
                f"every response took {floor:.0f} ms or more: ~40 ms is the client's delayed ACK,"
                " waited for when the server's connections lack TCP_NODELAY"
            )
        api.close()
        if browser is not None:
            browser.close()
    finally:
        if node is not None:
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
