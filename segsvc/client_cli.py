"""Client commands of `segsvc`: submit photos, follow jobs, fetch masks, list models over HTTP.

Exit codes (scripts may rely on them): 0 ok; 1 a job failed or a request was refused (bad image,
unknown job, timeout); 2 usage error; 3 server or network error; 4 authentication error;
130 after Ctrl-C; for `submit`, 143 after SIGTERM and 141 when stdout's reader went away.

The bulk-submit engine behind `submit` (listing, naming, sending in parallel, saving, the
outcome lines, summary and exit code) is in `segsvc/bulk_submit.py`.
"""

from __future__ import annotations

import functools
import json
import os
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from segsvc.bulk_submit import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SERVER,
    EXIT_STDOUT_CLOSED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    Interrupted,
    LocalFileError,
    Outcome,
    SubmitPlan,
    Terminated,
    describe,
    exit_code_for,
    image_files,
    outcome_line,
    output_names,
    print_outcome,
    run_all,
    sigterm_as_interrupt,
    silence_stdout,
    submit_exit_code,
    summary_table,
    with_results,
)
from segsvc.client import DEFAULT_URL, Client, RetryNotice, utf8_name
from segsvc.client_errors import (
    ClientError,
    InvalidKeyError,
    InvalidUrlError,
    NotFoundError,
    TransportError,
)
from segsvc.files import write_atomically

F = TypeVar("F", bound=Callable[..., Any])


def connection_options(func: F) -> F:
    """--url, --api-key and --retries, from flags or SEG_URL / SEG_API_KEY / SEG_RETRIES."""
    func = click.option(
        "--retries",
        envvar="SEG_RETRIES",
        default=5,
        show_default=True,
        type=click.IntRange(0, 20),
        help="Retries on 429/502/503/504 and network errors [env SEG_RETRIES].",
    )(func)
    func = click.option(
        "--api-key", envvar="SEG_API_KEY", help="API key [env SEG_API_KEY; else var/local_api_key]."
    )(func)
    return click.option(
        "--url",
        envvar="SEG_URL",
        default=None,
        help=f"Server base URL [env SEG_URL; else the local one, {DEFAULT_URL} or SEG_PORT's].",
    )(func)


def handle_errors(func: F) -> F:
    """Turn client errors into one plain line on stderr and the documented exit code; Ctrl-C
    into one line and 130, as `submit` (click's own "Aborted!" exits 1, a failed job's code)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("interrupted (Ctrl-C)", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except ClientError as exc:
            click.echo(f"error: {describe(exc)}", err=True)
            sys.exit(exit_code_for(exc))
        except OSError as exc:  # a local file: --out in a missing folder, no permission
            click.echo(
                f"error: {describe(LocalFileError(f'{type(exc).__name__}: {exc}'))}", err=True
            )
            sys.exit(EXIT_FAILED)

    return wrapper  # type: ignore[return-value]


def _ms(value: object) -> str:
    """A timing as people read it (`224.5ms`), `-` when there is none."""
    return f"{value:.1f}ms" if isinstance(value, int | float) else "-"


def make_client(url: str | None, api_key: str | None, retries: int = 5) -> Client:
    """A client from flags/env; the URL falls back to the one `make run` serves (its
    SEG_PORT), the key to the file it writes. A URL that cannot be a server's is a usage
    error (exit 2), said in one line before anything is sent."""
    from segsvc.settings import get_settings

    if not url:  # the key comes from `make run`'s settings: so does its port
        url = f"http://127.0.0.1:{get_settings().port}"
    if not api_key:
        key_file = get_settings().var_dir / "local_api_key"
        if key_file.is_file():
            api_key = key_file.read_text().strip()
    try:
        return Client(url, api_key or "", retries=retries, on_retry=retry_notice(retries))
    except InvalidUrlError as exc:  # `Client` checks it (`checked_url`) before sending anything
        click.echo(f"error: {exc} [--url or SEG_URL]", err=True)
        sys.exit(EXIT_USAGE)
    except InvalidKeyError as exc:  # never echoed: the message names the problem, not the key
        click.echo(f"error: {exc} [--api-key or SEG_API_KEY]", err=True)
        sys.exit(EXIT_AUTH)


def retry_notice(retries: int) -> RetryNotice:
    """A `Client.on_retry` that says once, in one line on stderr, that a connection which
    failed or broke is being retried: a wrong --url or a server that is down would otherwise
    look like a frozen progress bar until the retries have run out."""
    lock = threading.Lock()
    said = False

    def notice(error: ClientError, _pause_s: float) -> None:
        nonlocal said
        if not isinstance(error, TransportError):
            return
        with lock:
            if said:
                return
            said = True
        # sys.stderr as it is now: above the progress bar while one is drawn
        sys.stderr.write(f"warning: {error}; retrying (--retries {retries})...\n")
        sys.stderr.flush()

    return notice


@click.command("submit")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--wait", is_flag=True, help="Wait for every job to finish.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Save <name>.mask.png files here (implies --wait).",
)
@click.option("--overlay", is_flag=True, help="With --out, also save <name>.overlay.png.")
@click.option(
    "--again",
    is_flag=True,
    help="New jobs even for files an earlier run sent (within 24 h); by default a rerun "
    "gets the earlier run's jobs back instead of submitting the same files again.",
)
@click.option(
    "--skip-existing",
    is_flag=True,
    help="With --out, send no file whose results (<name>.mask.png, and .overlay.png with "
    "--overlay) are in the folder already: resume a run that stopped, without uploads.",
)
@click.option("--webhook", help="URL to notify when each job completes.")
@click.option("--webhook-events", help="Comma-separated: start,completed [completed].")
@click.option(
    "--batch",
    "-b",
    default=16,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Files per request (POST /v1/jobs/batch); 1 sends each file on its own.",
)
@click.option(
    "--concurrency",
    "-j",
    default=4,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Requests in flight at once.",
)
@click.option(
    "--timeout",
    default=300.0,
    show_default=True,
    help="Seconds to wait for the jobs of each request.",
)
@connection_options
def submit(
    paths: tuple[Path, ...],
    wait: bool,
    out: Path | None,
    overlay: bool,
    again: bool,
    skip_existing: bool,
    webhook: str | None,
    webhook_events: str | None,
    batch: int,
    concurrency: int,
    timeout: float,
    url: str | None,
    api_key: str | None,
    retries: int,
) -> None:
    """Submit photos (files or folders); prints a `job_id<TAB>status<TAB>file` line each."""
    skipped: list[Path] = []
    files = image_files(paths, out, skipped)
    if skipped:
        click.echo(
            f"note: {len(skipped)} files in the folders are segsvc results (*.mask.png, "
            "*.overlay.png, or under --out) and are not sent; name a file to send it",
            err=True,
        )
    if not files:
        raise click.UsageError("no image files found (looked for .jpg .jpeg .png .webp)")
    if skip_existing and out is None:
        raise click.UsageError("--skip-existing needs --out (the folder the results are in)")
    events = [e.strip() for e in webhook_events.split(",")] if webhook_events else None
    plan = SubmitPlan(wait, out, overlay, webhook, events, timeout, batch)
    plan.again = uuid.uuid4().hex if again else None
    plan.names = output_names(files)  # of every file: a resumed run names its results alike
    kept = [Outcome(p, status="exists") for p in with_results(files, plan)] if skip_existing else []
    # Not sent on their own, but still counted in the batches (see `SubmitPlan.saved`).
    plan.saved = frozenset(o.path for o in kept)
    stopped: Interrupted | None = None
    try:
        with sigterm_as_interrupt():
            print_kept(kept)
            with make_client(url, api_key, retries) as client:
                outcomes = kept + run_all(files, client, plan, concurrency)
    except Interrupted as exc:
        outcomes, stopped = kept + exc.outcomes, exc
    except KeyboardInterrupt as exc:  # before any file was sent
        outcomes, stopped = kept, Interrupted([], terminated=isinstance(exc, Terminated))
    try:
        report_submit(outcomes, stopped, len(files))
    except BrokenPipeError:  # stderr's reader is gone too
        sys.exit(EXIT_STDOUT_CLOSED)


def print_kept(kept: list[Outcome]) -> None:
    """The `-<TAB>exists<TAB>file` line of each file `--skip-existing` does not send;
    `Interrupted` when stdout's reader is gone (the rest of them go to stderr)."""
    to_terminal = sys.stdout.isatty()
    for i, outcome in enumerate(kept):
        try:
            print_outcome(outcome, to_terminal, None)
        except BrokenPipeError:
            silence_stdout()
            raise Interrupted([], kept[i:]) from None


def report_submit(outcomes: list[Outcome], stopped: Interrupted | None, files: int) -> None:
    """The summary on stderr, then exit with the run's code."""
    console = Console(stderr=True)
    if stopped is not None and stopped.unprinted:  # the lines as they would have been
        click.echo(f"stdout closed: {len(stopped.unprinted)} lines not printed there:", err=True)
        for outcome in stopped.unprinted:
            click.echo(outcome_line(outcome), err=True)
    console.print(summary_table(outcomes))
    for o in outcomes:
        if o.reason:  # file names and server messages are text, not markup: [x] stays [x]
            console.print(
                f"[red]{escape(o.status)}[/red] {escape(utf8_name(o.path))}: {escape(o.reason)}",
                highlight=False,
            )
    if stopped is not None:
        sent = sum(o.job_id != "-" for o in outcomes)
        why, code = "interrupted", EXIT_INTERRUPTED
        if stopped.unprinted:
            why, code = "stdout closed", EXIT_STDOUT_CLOSED
        elif stopped.terminated:
            why, code = "terminated (SIGTERM)", EXIT_TERMINATED
        console.print(
            f"{why}: {sent} of {files} files accepted; "
            f"{files - len(outcomes)} not reported (not sent, or a second Ctrl-C)"
        )
        sys.exit(code)
    sys.exit(submit_exit_code(outcomes))


@click.command("status")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the job's full JSON.")
@connection_options
@handle_errors
def status(job_id: str, as_json: bool, url: str | None, api_key: str | None, retries: int) -> None:
    """Show a job; exits 1 if it failed or was canceled."""
    with make_client(url, api_key, retries) as client:
        job = client.get(job_id)
    if as_json:
        click.echo(json.dumps(job.data, indent=2))
    else:
        m = job.metrics
        click.echo(
            f"{job.id}  {job.status}  model={job.model_version or '-'}  "
            f"queue={_ms(m.get('queue_ms'))}  predict={_ms(m.get('predict_ms'))}"
        )
        if job.error:
            click.echo(f"error: {job.error.get('message')}")
    sys.exit(EXIT_FAILED if job.status in ("failed", "canceled") else EXIT_OK)


@click.command("get")
@click.argument("job_id")
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="File to write, '-' for stdout [<id>.mask.png or <id>.overlay.png].",
)
@click.option("--overlay", is_flag=True, help="Fetch the overlay instead of the mask.")
@click.option(
    "--timeout",
    default=300.0,
    show_default=True,
    help="Seconds for it all: reading the job, waiting for it and fetching the image.",
)
@connection_options
@handle_errors
def get(
    job_id: str,
    out: Path | None,
    overlay: bool,
    timeout: float,
    url: str | None,
    api_key: str | None,
    retries: int,
) -> None:
    """Wait for a job and save its mask (values 0 pet, 1 background, 2 border) or overlay;
    prints the file's name (nothing when the image goes to stdout)."""
    kind = "overlay" if overlay else "mask"
    # One deadline for the whole command: the first read and the download too, not only the
    # wait between them (each of those, with its retries, took up to minutes from a stalled
    # server: 194 s for --timeout 2). Every request times out by it (see `Client._request`).
    started = time.monotonic()
    deadline = started + timeout
    with make_client(url, api_key, retries) as client:
        job = client.get(job_id, deadline=deadline)
        job.wait(timeout, since=started)  # at once for a job that has ended
        if not job.succeeded:
            reason = (job.error or {}).get("message") or "no result"
            click.echo(f"error: job {job.id} {job.status}: {reason}", err=True)
            sys.exit(EXIT_FAILED)
        data = client.result_png(job.id, kind, deadline=deadline)
    target = out or Path(f"{job.id}.{kind}.png")
    if str(target) == "-" or is_stdout(target):
        sys.stdout.flush()
        sys.stdout.buffer.write(data)  # the image alone: no name after it
        sys.stdout.buffer.flush()
        return
    write_result(target, data)
    click.echo(str(target))


def is_stdout(path: Path) -> bool:
    """Whether `path` is this process's stdout: /dev/stdout, /dev/fd/1, or the very file stdout
    is redirected to."""
    try:
        named, stdout = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):  # no such file; a stdout that is no file (a test's buffer)
        return False
    return (named.st_dev, named.st_ino) == (stdout.st_dev, stdout.st_ino)


def write_result(target: Path, data: bytes) -> None:
    """Write a result whole or not at all (a temporary file renamed into place) where it can
    be: a link's target, not the link (the link stays), when the link is the user's own; a
    named pipe or a device as it is.

    Another user's link is replaced, not followed: in a shared folder (/tmp) anyone may leave
    `mask.png -> ~victim/.bashrc` (or, for root, `-> /etc/shadow`) for the next `get -o` to
    write through, and the kernel's protected_symlinks cannot see a link resolved here."""
    real = Path(os.path.realpath(target)) if _own_link(target) else target
    if real.exists() and not real.is_file():  # a named pipe, /dev/null: no rename over it
        with real.open("wb") as fh:
            fh.write(data)
    else:
        write_atomically(real, data)


def _own_link(path: Path) -> bool:
    """Whether `path` is a symbolic link that this process's user owns."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISLNK(info.st_mode) and info.st_uid == os.getuid()


@click.command("cancel")
@click.argument("job_id")
@connection_options
@handle_errors
def cancel(job_id: str, url: str | None, api_key: str | None, retries: int) -> None:
    """Cancel a queued or running job; exits 1 if it had already ended otherwise."""
    with make_client(url, api_key, retries) as client:
        job = client.cancel(job_id)
    click.echo(f"{job.id}  {job.status}")
    if job.done and job.status != "canceled":
        click.echo(f"error: job {job.id} had already {job.status}; nothing to cancel", err=True)
        sys.exit(EXIT_FAILED)


@click.group("models")
def models() -> None:
    """Model versions as the API reports them."""


@models.command("list")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the raw JSON (versions and training runs)."
)
@connection_options
@handle_errors
def models_list(as_json: bool, url: str | None, api_key: str | None, retries: int) -> None:
    """List versions, status and traffic share (GET /v1/models)."""
    with make_client(url, api_key, retries) as client:
        try:
            body = client.models_body() if as_json else None
            rows = [] if as_json else client.models()
        except NotFoundError:
            click.echo(
                "error: this server has no /v1/models endpoint yet; on the server, "
                "`segsvc models list` reads the registry directly",
                err=True,
            )
            sys.exit(EXIT_SERVER)
    if as_json:
        click.echo(json.dumps(body, indent=2))
        return
    table = Table()
    for name in ("version", "status", "share", "mean IoU"):
        table.add_column(name)
    for row in rows:
        miou = (row.get("metrics") or {}).get("mean_iou")
        table.add_row(
            str(row.get("version")),
            str(row.get("status")),
            f"{float(row.get('traffic_share') or 0):.2f}",
            f"{miou:.3f}" if isinstance(miou, int | float) else "-",
        )
    Console(width=int(os.environ.get("COLUMNS", "100"))).print(table)


@click.group("client")
def client() -> None:
    """Talk to a running segsvc API over HTTP (URL and key from flags or SEG_URL/SEG_API_KEY).

    Exit codes: 0 ok, 1 job failed or request refused, 2 usage, 3 server/network, 4 auth,
    130 Ctrl-C (143 SIGTERM during submit).
    """


for _command in (submit, status, get, cancel, models):
    client.add_command(_command)
