"""The ``dicom-ai`` command. Logging is configured here and only here."""

from __future__ import annotations

import errno
import logging
import signal
import sqlite3
import ssl
import sys
from collections import defaultdict
from pathlib import Path
from types import FrameType
from typing import Annotated

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
        message = _start_failure(exc, cfg)
        if message is None:
            raise
        if node is not None:
            node.stop()  # the worker processes it started
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
    for uid, files in series.items():
        header = headers[uid]
        evaluation = rules.evaluate(header, sender)
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


@app.command()
def status(config: ConfigOption = None) -> None:
    """Counts of instances, series, jobs and deliveries; dead letters and failed jobs."""
    from dicom_ai.store.index import Index, StatusIndex
    from dicom_ai.store.states import DeliveryState, JobState

    cfg = load_config(config)
    index: StatusIndex = Index(cfg.node.data_dir / "index.sqlite3")
    table = Table(title=f"dicom-ai data in {cfg.node.data_dir}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for key, value in sorted(index.counts().items()):
        table.add_row(key, str(value))
    console.print(table)
    for job in index.jobs(JobState.FAILED):
        console.print(
            f"failed job {job.id} ({job.model}, series {job.series_instance_uid}): {job.error}"
        )
    for delivery in index.deliveries(DeliveryState.DEAD):
        console.print(
            f"dead letter {delivery.id} (job {delivery.job_id} -> {delivery.destination}): "
            f"{delivery.last_error}"
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
def models(config: ConfigOption = None) -> None:
    """List the models this config can route to."""
    cfg = _load_config(config)
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


if __name__ == "__main__":
    app()
