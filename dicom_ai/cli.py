"""The ``dicom-ai`` command. Logging is configured here and only here."""

from __future__ import annotations

import errno
import logging
import signal
import sqlite3
import ssl
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dicom_ai.config import Config, load_config
from dicom_ai.errors import ConfigError, DicomAIError
from dicom_ai.store.index import StudyMember

if TYPE_CHECKING:
    from dicom_ai.routing import RuleSet
    from dicom_ai.web.accounts import Accounts

app = typer.Typer(help="dicom-ai: a DICOM node that runs MONAI models on received series.")
rules_app = typer.Typer(help="Check and try rules files.")
app.add_typer(rules_app, name="rules")
console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config; embedded defaults if omitted.")
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging (may show PHI).")]
TLSCA = Annotated[
    Path | None, typer.Option("--tls-ca", help="Use DICOM TLS; verify the peer with these CAs.")
]
TLSCert = Annotated[
    Path | None, typer.Option("--tls-cert", help="Our TLS certificate (with --tls-key).")
]
TLSKey = Annotated[Path | None, typer.Option("--tls-key", help="Our TLS private key.")]


def _tls(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    from dicom_ai.config import ClientTLSConfig
    from dicom_ai.dimse.tls import client_context

    if ca is None and cert is None:
        return None
    try:
        return client_context(
            ClientTLSConfig(ca_certificates=ca, certificate=cert, private_key=key)
        )
    except (ValueError, ConfigError) as exc:
        raise _fail(str(exc)) from exc


def _configure_logging(verbose: bool) -> int:
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=err_console, show_path=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # pynetdicom's INFO lines describe every message; they are noise for an operator.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # MONAI warns on import that an optional GPU JPEG codec is missing; it is never used here.
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    return level


def _fail(message: str, code: int = 2) -> typer.Exit:
    # Never wrapped at the terminal's width (a line per problem), brackets printed as is.
    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def _load_config(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise _fail(str(exc)) from exc


def _start_failure(exc: Exception, cfg: Config) -> str | None:
    """What `serve` says when the node cannot start; None for a bug (which keeps its traceback).

    Every failure to start is mapped here: the operator gets one line naming what to fix.
    """
    if isinstance(exc, DicomAIError):
        return str(exc)
    data_dir = cfg.node.data_dir.resolve()
    if isinstance(exc, sqlite3.Error):
        return f"data_dir {data_dir} is not usable: index: {exc}"
    if not isinstance(exc, OSError):
        return None
    reason = exc.strerror or str(exc)
    if exc.filename is None and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
        # Binding a socket: its error names no file.
        node = cfg.node
        where = [f"{node.host}:{node.port}"] if node.port is not None else []
        if node.tls is not None:
            where.append(f"{node.host}:{node.tls.port} (TLS)")
        return f"cannot listen on {' and '.join(where)}: {reason}"
    if exc.filename is None:
        return f"cannot start: {reason}"
    path = Path(exc.filename).resolve()
    if path.is_relative_to(data_dir) or data_dir.is_relative_to(path):
        return f"data_dir {data_dir} is not usable: {path}: {reason}"
    return f"{path}: {reason}"


@app.command()
def serve(config: ConfigOption = None, verbose: Verbose = False) -> None:
    """Run the node: receive, route, infer, deliver."""
    from dicom_ai.node import Node

    level = _configure_logging(verbose)
    cfg = _load_config(config)
    node: Node | None = None
    try:
        node = Node(cfg, log_level=level)
        node.start()
    except Exception as exc:
        if node is not None:
            node.stop()  # the worker and console processes it started
        message = _start_failure(exc, cfg)
        if message is None:
            raise
        raise _fail(message) from exc
    started = node

    def _stop(signum: int, frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("signal %d: stopping", signum)
        started.request_stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log = logging.getLogger(__name__)
    ports = [f"{cfg.node.host}:{node.port}"] if node.port is not None else []
    if node.tls_port is not None:
        ports.append(f"{cfg.node.host}:{node.tls_port} (TLS)")
    log.info("dicom-ai ready on %s; data in %s", ", ".join(ports), cfg.node.data_dir)
    for title, called in cfg.called_ae_table().items():
        log.info("called AE %s: rules %s", title, called.rules)
    node.wait()
    node.stop()


@app.command()
def echo(
    peer: Annotated[str, typer.Argument(help="AE@HOST:PORT")],
    calling_ae: Annotated[str, typer.Option(help="Our AE title.")] = "DICOM_AI",
    tls_ca: TLSCA = None,
    tls_cert: TLSCert = None,
    tls_key: TLSKey = None,
) -> None:
    """C-ECHO a peer."""
    from dicom_ai.dimse.scu import Peer
    from dicom_ai.dimse.scu import echo as c_echo

    tls = _tls(tls_ca, tls_cert, tls_key)
    try:
        target = Peer.parse(peer)
        status = c_echo(target, calling_ae, tls=tls)
    except (ValueError, DicomAIError) as exc:
        raise _fail(str(exc), 1) from exc
    if status != 0:
        raise _fail(f"C-ECHO to {target} answered 0x{status:04X}", 1)
    console.print(f"C-ECHO to {target}: Success")


def _dicom_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return files


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (recursive).")],
    to: Annotated[str, typer.Option("--to", help="AE@HOST:PORT")],
    calling_ae: Annotated[str, typer.Option(help="Our AE title.")] = "DICOM_AI",
    tls_ca: TLSCA = None,
    tls_cert: TLSCert = None,
    tls_key: TLSKey = None,
) -> None:
    """C-STORE files to a peer, with a progress bar."""
    from dicom_ai.dimse.scu import Peer, send_files
    from dicom_ai.dimse.status import SendResult

    tls = _tls(tls_ca, tls_cert, tls_key)

    try:
        target = Peer.parse(to)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    files = _dicom_files(paths)
    if not files:
        raise _fail("no files to send")
    failed: list[SendResult] = []
    with Progress(
        TextColumn("[bold]C-STORE"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
    ) as progress:
        task = progress.add_task("send", total=len(files))

        def advance(result: SendResult) -> None:
            progress.advance(task)
            if not result.ok:
                failed.append(result)

        try:
            results = send_files(target, files, calling_ae, progress=advance, tls=tls)
        except DicomAIError as exc:
            raise _fail(str(exc), 1) from exc
    not_sent = [r for r in results if r.status is None]
    for result in failed + not_sent:
        status = "not sent" if result.status is None else f"0x{result.status:04X}"
        err_console.print(f"{result.path}: {status}")
    console.print(f"sent {len(results) - len(failed) - len(not_sent)} of {len(files)} to {target}")
    if failed or not_sent:
        raise typer.Exit(1)


@rules_app.command("check")
def rules_check(file: Annotated[Path, typer.Argument(help="Rules YAML file.")]) -> None:
    """Validate a rules file; errors name the line."""
    from dicom_ai.routing import load_rules

    try:
        rules = load_rules(file)
    except ConfigError as exc:
        raise _fail(str(exc), 1) from exc
    console.print(f"{file}: {len(rules.rules)} rules, valid")


@rules_app.command("show-default")
def rules_show_default() -> None:
    """Print the rules a node without `rules` in its config routes with (to start your own)."""
    from dicom_ai.config import DEFAULT_RULES

    sys.stdout.write(DEFAULT_RULES.read_text(encoding="utf-8"))


@rules_app.command("test")
def rules_test(
    file: Annotated[Path, typer.Argument(help="Rules YAML file.")],
    path: Annotated[Path, typer.Argument(help="A DICOM file or folder of series.")],
    calling_ae: Annotated[str, typer.Option(help="Sender context: calling AE.")] = "SCANNER",
    called_ae: Annotated[str, typer.Option(help="Sender context: called AE.")] = "DICOM_AI",
    source_ip: Annotated[str, typer.Option(help="Sender context: source address.")] = "127.0.0.1",
) -> None:
    """Show, for each series under PATH, which rule matches and why."""
    from dicom_ai.routing import SenderContext, load_rules

    try:
        rules = load_rules(file)
    except ConfigError as exc:
        raise _fail(str(exc), 1) from exc
    series: dict[str, list[Path]] = defaultdict(list)
    headers: dict[str, Dataset] = {}
    for candidate in _dicom_files([path]):
        try:
            ds = dcmread(candidate, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        uid = str(ds.get("SeriesInstanceUID", "?"))
        series[uid].append(candidate)
        headers.setdefault(uid, ds)
    if not series:
        raise _fail(f"no DICOM series under {path}", 1)
    sender = SenderContext(calling_ae, called_ae, source_ip)
    members: dict[tuple[str, str], list[StudyMember]] = defaultdict(list)
    for order, (uid, files) in enumerate(series.items()):
        header = headers[uid]
        evaluation = rules.evaluate(header, sender)
        for decision in evaluation.decisions:
            if decision.study is not None:
                study_uid = str(header.get("StudyInstanceUID", "?"))
                members[(study_uid, decision.rule)].append(
                    StudyMember(uid, decision.roles, decision.order_values, len(files), 1, order)
                )
        table = Table(
            # Header values and regexes are data, not markup: "[sz]" must print as is.
            title=escape(
                f"series {uid} ({header.get('Modality', '?')}, {len(files)} instances, "
                f"{header.get('SeriesDescription', '')!s})"
            ),
            title_justify="left",
        )
        table.add_column("rule")
        table.add_column("result")
        table.add_column("why")
        for trace in evaluation.trace:
            if trace.routed:
                result = "routes"
            else:
                result = "matches, not used" if trace.matched else "no match"
            why = "; ".join(trace.reasons)
            if trace.shadowed_by:
                why += f" (an earlier rule, {trace.shadowed_by}, already routed it)"
            table.add_row(escape(trace.rule), result, escape(why))
        console.print(table)
        if evaluation.decisions:
            for decision in evaluation.decisions:
                console.print(
                    f"  -> rule [bold]{escape(decision.rule)}[/bold]: model "
                    f"{escape(str(decision.model))}, "
                    f"destinations {escape(', '.join(decision.destinations)) or '-'}"
                )
        else:
            console.print("  -> no rule matched: the series is kept, not processed")
    for (study_uid, rule_name), found in members.items():
        _print_study(rules, rule_name, study_uid, found, headers)


def _print_study(
    rules: RuleSet,
    rule_name: str,
    study_uid: str,
    members: list[StudyMember],
    headers: dict[str, Dataset],
) -> None:
    """Which series of the study fill the study rule's roles (series in the order found,
    the last counting as received last), and what is missing."""
    from dicom_ai.routing.studies import select_roles

    rule = next(r for r in rules.rules if r.name == rule_name)
    assert rule.study is not None
    selection = select_roles(rule.study, members)
    console.print(escape(f"study {study_uid}, rule {rule_name} (model {rule.model}):"))
    for role, member in selection.chosen:
        if member is None:
            continue
        description = headers[member.series_instance_uid].get("SeriesDescription", "")
        console.print(
            escape(
                f"  role {role}: series {member.series_instance_uid} ({description!s}, "
                f"{member.instances} instances)"
            )
        )
    for note in selection.notes:
        console.print(escape(f"  {note}"))
    missing = [
        *(f"{role} (required)" for role in selection.missing_required),
        *(f"{role} (optional)" for role in selection.missing_optional),
    ]
    study = rule.study
    if missing:
        then = (
            "runs without the optional roles"
            if not selection.missing_required
            else ("fails" if study.at_deadline == "fail" else "keeps waiting")
        )
        console.print(
            f"  missing: {escape(', '.join(missing))}; at the deadline, "
            f"{study.deadline_seconds:g} s after the study's first instance, it {then}"
        )
    else:
        console.print("  -> every role is filled: the study job starts")


@app.command()
def status(config: ConfigOption = None) -> None:
    """Counts of instances, series, jobs and deliveries; the spool, free space, and what is
    held back and why; dead letters and failed jobs."""
    from dicom_ai.receivers import open_store
    from dicom_ai.store.states import DeliveryState, JobState

    cfg = load_config(config)
    spool, index = open_store(cfg)
    table = Table(title=f"dicom-ai data in {cfg.node.data_dir}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for key, value in sorted(index.counts().items()):
        table.add_row(key, str(value))
    console.print(table)
    usage = index.storage_usage()
    console.print(
        f"spool: {_size(usage.instance_bytes + usage.result_bytes)} "
        f"({usage.instances} received instances, {_size(usage.instance_bytes)}; results of "
        f"{usage.result_jobs} jobs, {_size(usage.result_bytes)}); "
        f"{_size(spool.free_bytes())} free on its filesystem"
    )
    for held in usage.held_back:
        console.print(f"held back: {held.count} ({_size(held.bytes)}), {held.reason}")
    for study in index.studies(("waiting", "overdue", "failed")):
        when = datetime.fromtimestamp(study.deadline_at, UTC).strftime("%H:%M:%S UTC")
        console.print(
            escape(
                f"study {study.study_instance_uid} (rule {study.rule}, {study.state}, "
                f"{len(study.members)} series, deadline {when}): {study.note or ''}"
            )
        )
    for uid, here, missing in index.not_run_for_purge():
        console.print(
            f"not run: series {uid} ({here} instances here): sent after the series was "
            f"purged; {missing} purged instances have not come back"
        )
    for job in index.jobs(JobState.FAILED):
        console.print(
            f"failed job {job.id} ({job.model}, series {job.series_instance_uid}): {job.error}"
        )
    for delivery in index.deliveries(DeliveryState.DEAD):
        console.print(
            f"dead letter {delivery.id} (job {delivery.job_id} -> {delivery.destination}): "
            f"{delivery.last_error}"
        )
    for job in index.cluster_jobs():
        console.print(
            escape(
                f"job {job.id} ({job.model}, {job.state.value}, attempt {job.attempts}): "
                f"ran on cluster node {job.ran_on}"
            )
        )


@app.command()
def resubmit(config: ConfigOption = None) -> None:
    """Move every dead-letter delivery back to pending (the running node picks them up)."""
    from dicom_ai.store.index import Index, StatusIndex

    cfg = load_config(config)
    index: StatusIndex = Index(cfg.node.data_dir / "index.sqlite3")
    count = index.resubmit_dead()
    console.print(f"{count} dead-letter deliveries resubmitted")


@app.command()
def discard(
    delivery_ids: Annotated[list[int], typer.Argument(help="Dead-letter delivery ids.")],
    config: ConfigOption = None,
) -> None:
    """Give up dead-letter deliveries: they are never sent, and their results may then be
    purged (storage.keep_results_hours after they ended)."""
    from dicom_ai.store.index import Index

    cfg = load_config(config)
    index = Index(cfg.node.data_dir / "index.sqlite3")
    refused = [d for d in delivery_ids if not index.discard_delivery(d)]
    console.print(f"{len(delivery_ids) - len(refused)} dead-letter deliveries discarded")
    if refused:
        raise _fail(f"not dead letters, left as they are: {', '.join(map(str, refused))}", 1)


@app.command()
def purge(
    config: ConfigOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be deleted; delete nothing.")
    ] = False,
) -> None:
    """Delete now what the storage policy says may go (the running node does this every
    storage.cleanup_interval_seconds); nothing undelivered is ever deleted."""
    from dicom_ai.receivers import open_store
    from dicom_ai.store.retention import Purger, RetentionPolicy, sweep

    cfg = load_config(config)
    spool, index = open_store(cfg)
    purger = Purger(index, spool, RetentionPolicy.from_config(cfg.storage))
    if not dry_run:
        swept = sweep(index, spool)  # what an interrupted purge (or this command) left
        if swept:
            console.print(
                f"finished {swept.series} interrupted series purges, removed "
                f"{swept.result_folders} result folders"
            )
    if dry_run:
        plan = purger.plan()
        table = Table(title="would be deleted now")
        for column in ("what", "count", "files", "size"):
            table.add_column(column, justify="left" if column == "what" else "right")
        table.add_row(
            "received instances (series)",
            str(len(plan.sources)),
            str(sum(c.files for c in plan.sources)),
            _size(sum(c.bytes for c in plan.sources)),
        )
        table.add_row(
            "results (jobs)", str(len(plan.results)), "", _size(sum(c.bytes for c in plan.results))
        )
        for name, n in plan.records.items():
            table.add_row(f"index rows: {name}", str(n), "", "")
        console.print(table)
    else:
        report = purger.purge()
        console.print(f"purged {report.summary()}")
    for held in index.storage_usage().held_back:
        console.print(f"held back: {held.count} ({_size(held.bytes)}), {held.reason}")


def _size(size: int) -> str:
    if size < 1000:
        return f"{size} bytes"
    value = size / 1000
    for unit in ("kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


models_app = typer.Typer(
    help="The models this config can route to: list (the default), check, prepare.",
    invoke_without_command=True,
)
app.add_typer(models_app, name="models")


@models_app.callback()
def models(ctx: typer.Context, config: ConfigOption = None) -> None:
    """List the models this config can route to (also `models list`); check; prepare."""
    ctx.obj = config
    if ctx.invoked_subcommand is None:
        _list_models(_load_config(config))


def _models_config(ctx: typer.Context, config: Path | None) -> Config:
    # `dicom-ai models --config F check` and `dicom-ai models check --config F` alike.
    return _load_config(config if config is not None else ctx.obj)


@models_app.command("list")
def models_list(ctx: typer.Context, config: ConfigOption = None) -> None:
    """List the models this config can route to."""
    _list_models(_models_config(ctx, config))


def _list_models(cfg: Config) -> None:
    table = Table(title="models")
    table.add_column("id")
    table.add_column("source")
    table.add_column("task")
    table.add_column("threshold", justify="right")
    table.add_column("device")
    table.add_column("timeout s", justify="right")
    for model_id in sorted(cfg.known_models()):
        model = cfg.model(model_id)
        # Both built-ins segment; a bundle's metadata says, unless the config overrides it.
        task = "segmentation" if model.bundle is None else model.task or "from metadata.json"
        table.add_row(
            model_id,
            str(model.bundle or "built in"),
            task,
            f"{model.threshold:g}",
            model.device,
            f"{model.timeout_seconds:g}",
        )
    console.print(table)


@models_app.command("check")
def models_check(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Check every bundle model: loads, declared vs installed versions, a forward pass.

    Each runs in a subprocess on the interpreter its jobs run (a prepared environment, else
    the node's). Exit code 1 when any model is broken.
    """
    from dicom_ai.inference.check import CheckResult, run_check
    from dicom_ai.inference.environment import prepared_python

    cfg = _models_config(ctx, config)
    table = Table(title="model check")
    for column in ("model", "python", "loads", "forward", "declared -> installed"):
        table.add_column(column)
    table.add_column("verdict", ratio=1)
    broken: list[tuple[str, CheckResult]] = []
    for model_id in sorted(cfg.known_models()):
        model = cfg.model(model_id)
        if model.bundle is None:
            table.add_row(model_id, "node", "built in", "", "", "not checked (built in)")
            continue
        python = prepared_python(cfg.node.data_dir, model.bundle)
        with err_console.status(f"checking {model_id}"):
            result = run_check(
                model.bundle,
                python,
                timeout=model.timeout_seconds,
                task=model.task,
                config_files=tuple(model.config_files),
            )
        if not result.ok:
            broken.append((model_id, result))
        # Optional packages only when missing: a newer one is what the node runs anyway.
        drift = [p for p in result.drift() if p.role != "optional" or p.installed is None]
        versions = "\n".join(
            p.describe() + ("" if p.role == "core" else f" ({p.role})") for p in drift
        )
        shape = "x".join(str(n) for n in result.input_shape)
        forward = {"ok": f"ok {shape}", "": "-"}.get(result.forward, "failed")
        table.add_row(
            model_id,
            "node" if python is None else f"env {python.parent.parent.name}",
            {"ok": "yes", "": "-"}.get(result.load, "no"),
            forward,
            escape(versions),
            "[green]ok[/green]" if result.ok else f"[red]{escape(result.verdict)}[/red]",
        )
    console.print(table)
    for model_id, result in broken:
        err_console.print(
            f"[red]broken:[/red] {escape(model_id)}: {escape(result.verdict)}",
            soft_wrap=True,
            highlight=False,
        )
    if broken:
        raise typer.Exit(1)


Wheelhouse = Annotated[
    Path | None,
    typer.Option(
        "--wheelhouse",
        help="Wheels to install from first (default: $DICOM_AI_WHEELHOUSE, else the node "
        "environment's wheelhouse/, which install.sh fills).",
    ),
]
NoIndex = Annotated[
    bool, typer.Option("--no-index", help="Install from the wheelhouse only (no network).")
]


@models_app.command("prepare")
def models_prepare(
    ctx: typer.Context,
    config: ConfigOption = None,
    wheelhouse: Wheelhouse = None,
    no_index: NoIndex = False,
) -> None:
    """Build an environment for each bundle model that fails its check here, from the
    versions its metadata.json declares; built once (a second run does nothing)."""
    from dicom_ai.inference.check import run_check
    from dicom_ai.inference.environment import default_wheelhouse, prepare, prepared

    cfg = _models_config(ctx, config)
    _configure_logging(False)
    wheels = wheelhouse or default_wheelhouse()
    table = Table(title=f"bundle environments in {cfg.node.data_dir / 'bundle-envs'}")
    for column in ("model", "environment", "installed", "not installed", "verdict"):
        table.add_column(column)
    still_broken = []
    for model_id in sorted(cfg.known_models()):
        model = cfg.model(model_id)
        if model.bundle is None:
            continue
        task, config_files = model.task, tuple(model.config_files)
        env = prepared(cfg.node.data_dir, model.bundle)
        if env is None:
            with err_console.status(f"checking {model_id} in the node's environment"):
                here = run_check(
                    model.bundle,
                    None,
                    timeout=model.timeout_seconds,
                    task=task,
                    config_files=config_files,
                )
            if here.ok or here.inconclusive:
                verdict = "ok" if here.ok else here.verdict
                table.add_row(model_id, "not needed (node's)", "", "", escape(verdict))
                if not here.ok:
                    still_broken.append(model_id)
                continue
            err_console.print(f"{model_id}: {here.verdict}", soft_wrap=True, highlight=False)
            try:
                env = prepare(
                    model.bundle,
                    cfg.node.data_dir,
                    wheels,
                    use_index=not no_index,
                    timeout=model.timeout_seconds,
                    progress=lambda line: err_console.print(line, highlight=False),
                    task=task,
                    config_files=config_files,
                )
            except DicomAIError as exc:
                raise _fail(f"{model_id}: {exc}", 1) from exc
        if not env.ok:
            still_broken.append(model_id)
        table.add_row(
            model_id,
            f"{Path(env.python).parent.parent.name}" + ("" if env.built_now else " (existing)"),
            escape("\n".join(env.installed)),
            escape("\n".join(f"{r}: {why}" for r, why in env.not_installed)),
            "[green]ok[/green]" if env.ok else f"[red]{escape(env.verdict)}[/red]",
        )
    console.print(table)
    if still_broken:
        raise _fail(f"still broken: {', '.join(still_broken)}", 1)


users_app = typer.Typer(help="The console's users: add, list, remove, token.")
app.add_typer(users_app, name="users")
audit_app = typer.Typer(help="The console's append-only audit log.")
app.add_typer(audit_app, name="audit")


def _accounts(config: Path | None) -> Accounts:
    from dicom_ai.web.accounts import Accounts

    cfg = _load_config(config)
    return Accounts(cfg.node.data_dir / "console.sqlite3", cfg.web.session_hours * 3600)


def _read_password() -> str:
    """Twice: with getpass on a terminal, else two lines of standard input (scripts)."""
    if sys.stdin.isatty():
        import getpass

        first = getpass.getpass("Password: ")
        second = getpass.getpass("Password again: ")
    else:
        first = sys.stdin.readline().rstrip("\r\n")
        second = sys.stdin.readline().rstrip("\r\n")
    if first != second:
        raise _fail("the two passwords differ", 1)
    return first


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="User name.")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "viewer",
    config: ConfigOption = None,
) -> None:
    """Add a console user; the password is asked twice (or read twice from stdin)."""
    from dicom_ai.web.accounts import AccountsError

    accounts = _accounts(config)
    password = _read_password()
    try:
        user = accounts.add_user(name, role, password)
    except AccountsError as exc:
        raise _fail(str(exc), 1) from exc
    accounts.audit("cli", "user.add", user.name, {"role": user.role.value}, "cli")
    console.print(f"user {user.name} added ({user.role.value})")


@users_app.command("list")
def users_list(config: ConfigOption = None) -> None:
    """The console's users and their roles."""
    table = Table("user", "role")
    for user in _accounts(config).users():
        table.add_row(escape(user.name), user.role.value)
    console.print(table)


@users_app.command("remove")
def users_remove(
    name: Annotated[str, typer.Argument(help="User name.")], config: ConfigOption = None
) -> None:
    """Remove a user, with their tokens and sessions."""
    accounts = _accounts(config)
    if not accounts.remove_user(name):
        raise _fail(f"no user {name!r}", 1)
    accounts.audit("cli", "user.remove", name, {}, "cli")
    console.print(f"user {name} removed")


@users_app.command("token")
def users_token(
    name: Annotated[str, typer.Argument(help="User name.")], config: ConfigOption = None
) -> None:
    """Print a new API token for NAME (Authorization: Bearer TOKEN); only its hash is kept."""
    from dicom_ai.web.accounts import AccountsError

    accounts = _accounts(config)
    try:
        token = accounts.new_token(name)
    except AccountsError as exc:
        raise _fail(str(exc), 1) from exc
    accounts.audit("cli", "user.token", name, {}, "cli")
    sys.stdout.write(token + "\n")


@audit_app.command("export")
def audit_export(
    config: ConfigOption = None,
    after: Annotated[int, typer.Option(help="Only entries after this id.")] = 0,
) -> None:
    """Write the audit log as JSON lines (oldest first) to standard output."""
    import json

    for entry in _accounts(config).audit_entries(after_id=after):
        line = {
            "id": entry.id,
            "at": entry.at,
            "user": entry.user,
            "action": entry.action,
            "target": entry.target,
            "detail": entry.detail,
            "address": entry.address,
        }
        sys.stdout.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    app()
