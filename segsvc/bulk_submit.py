"""The bulk-submit engine behind `segsvc submit`: list the image files given (files and
folders) and name each one's results, send them in parallel (several per request) with a
progress bar on stderr, wait for the jobs and save their results, then report: one
`job_id<TAB>status<TAB>file` line per file, a summary table and the run's exit code.

Also the pieces the client commands share with it: the exit codes, the errors of one local
file, `exit_code_for` and `describe`. The click commands are in `segsvc/client_cli.py`.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from segsvc.client import STOPPABLE_POLL_S, Client, InvalidJobIdError, Job, content_key, utf8_name
from segsvc.client_errors import (
    ApiError,
    AuthError,
    ClientError,
    ConflictError,
    InvalidRequestError,
    RateLimitedError,
    RetriesStoppedError,
    ServerError,
    TransportError,
    WaitStoppedError,
    WaitTimeoutError,
)
from segsvc.files import write_atomically

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SERVER, EXIT_AUTH = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
EXIT_TERMINATED = 143  # SIGTERM (timeout(1), docker stop, a CI cancel), as shells report it
EXIT_STDOUT_CLOSED = 141  # stdout's reader went away (`| head -1`), as shells report SIGPIPE


class LocalFileError(ClientError):
    """A file of this machine could not be read or a result not written (exit code 1)."""


class UnexpectedError(ClientError):
    """Anything else that went wrong with one file (exit code 1): the run goes on, so the
    files sent before and after it are still reported."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(f"unexpected {type(exc).__name__}: {exc}")


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
# The names `submit --out` gives results: a folder search leaves such files out.
RESULT_SUFFIXES = (".mask.png", ".overlay.png")
# How the server begins a batch's refusal over one of its images ("Image 3 (x.jpg): ...").
ABOUT_ONE_IMAGE = re.compile(r"Image \d+ \(")
# The server's codes for what is wrong with one upload (its size, type or pixels).
IMAGE_ERROR_CODES = frozenset(
    {"invalid_image", "unsupported_media_type", "payload_too_large", "poison_input"}
)


def exit_code_for(exc: ClientError) -> int:
    """The documented exit code for a client error."""
    if isinstance(exc, InvalidJobIdError):  # a job id argument that is not one: usage
        return EXIT_USAGE
    if isinstance(exc, AuthError):
        return EXIT_AUTH
    if isinstance(exc, TransportError | ServerError | RateLimitedError):
        return EXIT_SERVER
    return EXIT_FAILED


def describe(exc: BaseException) -> str:
    """One line for people."""
    if isinstance(exc, AuthError):
        return f"{exc.message} (check --api-key or SEG_API_KEY)"
    if isinstance(exc, ApiError):
        return f"{exc.message} [{exc.status} {exc.code}]"
    return str(exc)


def image_files(
    paths: tuple[Path, ...], out: Path | None = None, skipped: list[Path] | None = None
) -> list[Path]:
    """Files as given, plus the images found under directories (sorted); each file once, where
    it first appears (`photos/ photos/cat.jpg`, `cat.jpg ./cat.jpg` or two links to one file
    would send it twice: two jobs, two rate-limit tokens, results named cat-2).

    A folder search leaves segsvc's own results out (a rerun with `--out` inside the folder
    would send them as photos): files named `*.mask.png` or `*.overlay.png`, and everything
    under `out` when `out` is a folder inside the one searched. A file named as such is sent
    whatever its name. What was left out is added to `skipped`."""
    found: list[Path] = []
    out_real = Path(os.path.realpath(out)) if out is not None else None
    for path in paths:
        if not path.is_dir():
            found.append(path)
            continue
        folder = Path(os.path.realpath(path))
        results = out_real if out_real and out_real.is_relative_to(folder) else None
        if results == folder:  # results beside the photos: only their names tell them apart
            results = None
        for p in sorted(files_under(path)):
            if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
                continue  # only files: not a folder named x.jpg, nor a link to nothing
            if p.name.lower().endswith(RESULT_SUFFIXES) or (
                results is not None and Path(os.path.realpath(p)).is_relative_to(results)
            ):
                if skipped is not None:
                    skipped.append(p)
                continue
            found.append(p)
    seen: set[str] = set()
    unique: list[Path] = []
    for path in found:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def files_under(folder: Path) -> Iterator[Path]:
    """Every entry under `folder` that is not a folder, linked folders searched too (Path.rglob
    of Python 3.11 does not descend into them, while it lists linked files: a folder of links
    to the photos' folders was silently empty). Each folder is searched once, known by its
    (st_dev, st_ino), so a link to a folder above it (`photos/all -> ..`) cannot loop; the
    folders are walked in name order, so which path of a folder reached twice is searched
    does not depend on the order the file system lists them in."""
    walked: set[tuple[int, int]] = set()
    for root, folders, names in os.walk(folder, followlinks=True):
        try:
            info = os.stat(root)
        except OSError:  # gone since it was listed
            folders[:] = []
            continue
        if (info.st_dev, info.st_ino) in walked:
            folders[:] = []  # searched already, by another path
            continue
        walked.add((info.st_dev, info.st_ino))
        folders.sort()
        for name in names:
            yield Path(root) / name


def output_names(files: list[Path]) -> dict[Path, str]:
    """The name each file's results get in the output folder: its stem, or, for files that
    share a stem (a/cat.jpg and b/cat.jpg, dog.jpg and dog.png, Cat.jpg and cat.png), its path
    with the folders and the suffix kept (a_cat.jpg), so that no result overwrites another.
    Names compare case-folded and Unicode-normalised (macOS and Windows folders do: café
    typed two ways is one name there), and one that would still clash (../x/cat.jpg and
    x/cat.jpg, a/b/cat.jpg and a_b/cat.jpg) gets a number (a_b_cat.jpg-2)."""

    def folded(name: str) -> str:
        return unicodedata.normalize("NFC", name).casefold()

    stems: dict[str, int] = {}
    for path in files:
        stems[folded(path.stem)] = stems.get(folded(path.stem), 0) + 1
    try:  # the folders the files have in common are left out of the names
        root = Path(os.path.commonpath([str(path.parent) for path in files]))
    except ValueError:  # absolute and relative paths mixed
        root = Path()

    def by_path(path: Path) -> str:
        relative = path.relative_to(root) if path.is_relative_to(root) else path
        return "_".join(part for part in relative.parts if part not in ("/", ".", ".."))

    names: dict[Path, str] = {}
    taken: set[str] = set()
    for path in files:
        name = path.stem if stems[folded(path.stem)] == 1 else by_path(path)
        unique, n = name, 2
        while folded(unique) in taken:
            unique, n = f"{name}-{n}", n + 1
        taken.add(folded(unique))
        names[path] = unique
    return names


@dataclass
class Outcome:
    """What happened to one file."""

    path: Path
    job_id: str = "-"
    status: str = "error"
    error: ClientError | None = None
    reason: str = ""
    latency_s: float | None = None
    predict_ms: float | None = None


@dataclass
class SubmitPlan:
    """The options of one `submit` run."""

    wait: bool
    out: Path | None
    overlay: bool
    webhook: str | None
    webhook_events: list[str] | None
    timeout: float
    batch: int = 1  # files per request (`POST /v1/jobs/batch` when > 1)
    # `--again`: new jobs even for files an earlier run (within the server's 24 h) submitted;
    # this run's keys are then its own (stable across its retries), not the content's.
    again: str | None = None
    # Set once a batch was refused although each of its files was then accepted on its own (a
    # server limit lower than `batch`, or no batch submits): later files go one by one.
    batches_refused: threading.Event = field(default_factory=threading.Event)
    names: dict[Path, str] = field(default_factory=dict)  # output name per file (output_names)
    # `--skip-existing`: the files whose results are in the output folder already. They are
    # reported, not sent, but the batches are still cut from every file, as the run that
    # saved them cut them: a batch's key is derived from its files (see `key`), so batches
    # cut from the rest alone would all get new keys, and the server would store new jobs.
    saved: frozenset[Path] = frozenset()
    # Why the run stopped sending (set with the stop event: see `halt`).
    stop_reason: str = ""
    # Result downloads (mask, overlay) in flight at once, across the run: the server decodes a
    # large photo for each, and queues only a few per key (429 large_decodes_pending beyond).
    fetches: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(4))

    def key(self, paths: list[Path], batch: bool) -> str:
        """The Idempotency-Key of a submit of `paths` (read here): derived from the files'
        names and bytes and the options, so a rerun gets the jobs it stored back (see
        `content_key`)."""
        images = [(utf8_name(path.name), path.read_bytes()) for path in paths]
        key = content_key(
            images, batch=batch, webhook=self.webhook, webhook_events=self.webhook_events
        )
        if self.again:
            return "segsvc-" + hashlib.sha256(f"{key}\0{self.again}".encode()).hexdigest()
        return key

    @property
    def waiting(self) -> bool:
        return self.wait or self.out is not None


def halt(stop: threading.Event, plan: SubmitPlan, why: str) -> None:
    """Stop the run: no file is sent after this (the first reason given is kept)."""
    if not plan.stop_reason:
        plan.stop_reason = why
    stop.set()


def stopped_reason(plan: SubmitPlan, what: str) -> str:
    """`what` (not sent, not waited for) and why the run stopped."""
    return f"{what}: the run stopped ({plan.stop_reason or 'Ctrl-C'})"


def submit_one(
    client: Client,
    path: Path,
    plan: SubmitPlan,
    stop: threading.Event,
    batch_refusal: ApiError | None = None,
) -> Outcome:
    """Submit one file, then (optionally) wait and save its results. `batch_refusal`: how
    the server refused the batch this file was in, when it named no image (see
    `refuses_every_file`)."""
    outcome = Outcome(path)
    if stop.is_set():
        outcome.status, outcome.reason = "skipped", stopped_reason(plan, "not sent")
        return outcome
    started = time.monotonic()
    job: Job | None = None
    try:
        job = client.submit(
            path,
            webhook=plan.webhook,
            webhook_events=plan.webhook_events,
            wait=STOPPABLE_POLL_S if plan.waiting else 0.0,  # Ctrl-C is noticed this soon
            idempotency_key=plan.key([path], batch=False),
        )
        outcome.job_id, outcome.status = job.id, job.status
        if plan.waiting:
            job.wait(plan.timeout, stop=stop)  # at once when the submit returned it finished
            finish(outcome, job, plan, started)
    except WaitStoppedError as exc:
        if job is None:  # Ctrl-C before a retry of the submit itself
            failed(outcome, exc, stop, plan)
        else:
            outcome.status, outcome.reason = job.status, stopped_reason(plan, "not waited for")
    except ClientError as exc:
        failed(outcome, exc, stop, plan)
        if job is None and refuses_every_file(exc, batch_refusal):
            halt(stop, plan, "the server refuses every file alike: see the error above")
    except OSError as exc:  # unreadable file, or a result that could not be written
        failed(outcome, LocalFileError(f"{type(exc).__name__}: {exc}"), stop, plan)
    except Exception as exc:  # anything else fails this file only (its job id is kept)
        failed(outcome, UnexpectedError(exc), stop, plan)
    return outcome


def refuses_every_file(exc: ClientError, batch_refusal: ApiError | None) -> bool:
    """Whether the server's refusal of one file's submit would hit every file alike: a
    `validation_error` (the server's code for a form field it refuses: --webhook,
    --webhook-events; what is wrong with an image has codes of its own: invalid_image,
    unsupported_media_type, payload_too_large, bad_request for an empty file), or the very
    refusal its batch got without naming an image (unless its code is an image's: a batch
    over the server's size limit and a file over the single limit get the same 413)."""
    if not isinstance(exc, InvalidRequestError) or exc.code in IMAGE_ERROR_CODES:
        return False
    if exc.code == "validation_error":
        return True
    return batch_refusal is not None and (exc.status, exc.code, exc.message) == (
        batch_refusal.status,
        batch_refusal.code,
        batch_refusal.message,
    )


def submit_chunk(
    client: Client, paths: list[Path], plan: SubmitPlan, stop: threading.Event
) -> list[Outcome]:
    """Submit several files in one request (all accepted or none), then wait for them together.

    When the server refuses the batch as a whole over one file (a bad image, a batch over its
    limits, a server without batch submits), each file is sent on its own instead, so every
    file still gets its own answer; errors that would hit every file alike are not retried,
    and a refusal of the first file sent on its own that would hit every file alike (a form
    field the server refuses, or the batch's own refusal again when it named no image: see
    `refuses_every_file`) stops the run instead of costing one request per file.

    Only the files not in `plan.saved` get an outcome (and their results saved). A batch
    with some of them is still sent whole, under the key the run that saved the others gave
    it, so the server replays the jobs it stored then; sent one by one, each file has its
    own key, whatever its batch, and the saved ones are not sent again. With `--again` the
    keys are this run's own: nothing to replay, so only the files without results are sent."""
    wanted = [path for path in paths if path not in plan.saved]
    if not wanted:
        return []
    if plan.again:
        paths = wanted
    if len(paths) == 1 or stop.is_set() or plan.batches_refused.is_set():
        return [submit_one(client, path, plan, stop) for path in wanted]
    started = time.monotonic()
    try:
        jobs = client.submit_batch(
            paths,
            webhook=plan.webhook,
            webhook_events=plan.webhook_events,
            idempotency_key=plan.key(paths, batch=True),
        )
    except (AuthError, TransportError, ServerError, RateLimitedError) as exc:  # a 408 included:
        # a network failure, not a refusal of the batch
        return [failed(Outcome(path), exc, stop, plan) for path in wanted]
    except ConflictError as exc:  # the batch's key is still in use: its jobs may be stored, and
        # sending the files again one by one would store each of them twice
        return [failed(Outcome(path), exc, stop, plan) for path in wanted]
    except RetriesStoppedError as exc:  # Ctrl-C before a retry: nothing more is sent
        return [failed(Outcome(path), exc, stop, plan) for path in wanted]
    except (ApiError, OSError, ValueError) as exc:  # one file refused, unreadable or not
        # sendable: each gets its own answer
        refusal = (
            exc if isinstance(exc, ApiError) and not ABOUT_ONE_IMAGE.match(exc.message) else None
        )
        singles = [submit_one(client, path, plan, stop, refusal) for path in wanted]
        if all(outcome.error is None for outcome in singles):  # not a file: the batch itself
            plan.batches_refused.set()
        return singles
    except Exception as exc:
        return [failed(Outcome(path), UnexpectedError(exc), stop, plan) for path in wanted]
    # The jobs of the saved files (replayed) are neither reported again nor waited for.
    sent = [(path, job) for path, job in zip(paths, jobs, strict=True) if path not in plan.saved]
    jobs = [job for _, job in sent]
    outcomes = [Outcome(path, job.id, job.status) for path, job in sent]
    if not plan.waiting:
        return outcomes
    waited: ClientError | None = None
    try:
        client.wait_many(jobs, plan.timeout, stop=stop)
    except ClientError as exc:  # a timeout or a lost server: the jobs that ended still count
        waited = exc
    except Exception as exc:
        waited = UnexpectedError(exc)
    # The chunk's jobs were seen ended together: each one's latency is now, not after the
    # downloads of the files before it in the chunk (which made it grow with its position).
    ended = time.monotonic()
    for outcome, job in zip(outcomes, jobs, strict=True):
        if not job.done and isinstance(waited, WaitStoppedError):
            outcome.status, outcome.reason = job.status, stopped_reason(plan, "not waited for")
            continue
        if not job.done:
            timed_out = WaitTimeoutError(f"job {job.id} still {job.status}")
            failed(outcome, waited or timed_out, stop, plan)
            continue
        try:
            finish(outcome, job, plan, started, ended)
        except ClientError as exc:  # fetching its results failed
            failed(outcome, exc, stop, plan)
        except OSError as exc:  # writing them failed (a full disk, no permission)
            failed(outcome, LocalFileError(f"{type(exc).__name__}: {exc}"), stop, plan)
        except Exception as exc:
            failed(outcome, UnexpectedError(exc), stop, plan)
    return outcomes


def finish(
    outcome: Outcome, job: Job, plan: SubmitPlan, started: float, ended: float | None = None
) -> None:
    """Record how an ended job went (its latency: `started` to `ended`, else to now) and save
    its results when asked to."""
    ended = time.monotonic() if ended is None else ended
    outcome.status, outcome.latency_s = job.status, ended - started
    outcome.predict_ms = job.metrics.get("predict_ms")
    outcome.reason = (job.error or {}).get("message", "")
    if job.succeeded and plan.out:
        save_results(job, outcome.path, plan)


def failed(outcome: Outcome, exc: ClientError, stop: threading.Event, plan: SubmitPlan) -> Outcome:
    """Mark a file as not done because of `exc`. An auth error, a server that stayed
    unreachable through the retries (a 408 included), or one still unavailable (503) after
    them, stops the files not yet sent: each would only fail the same way (a wrong --url kept
    a run retrying every chunk in turn for minutes)."""
    outcome.status, outcome.error, outcome.reason = "error", exc, describe(exc)
    if isinstance(exc, AuthError):
        halt(stop, plan, "the server refused the API key")
    elif isinstance(exc, TransportError):
        halt(stop, plan, "the server could not be reached")
    elif isinstance(exc, ServerError) and exc.status == 503:
        halt(stop, plan, f"the server stayed unavailable through the retries: {exc.code}")
    return outcome


def result_names(path: Path, plan: SubmitPlan) -> list[str]:
    """The files `save_results` writes for `path` into the output folder."""
    name = plan.names.get(path, path.stem)
    return [f"{name}.mask.png", *([f"{name}.overlay.png"] if plan.overlay else [])]


def with_results(files: list[Path], plan: SubmitPlan) -> list[Path]:
    """The files whose results are all in the output folder already (`--skip-existing`):
    an earlier run saved them (each is written whole or not at all, see `save_results`)."""
    assert plan.out is not None
    out = plan.out
    return [p for p in files if all((out / n).is_file() for n in result_names(p, plan))]


def save_results(job: Job, path: Path, plan: SubmitPlan) -> None:
    """Write <name>.mask.png (and .overlay.png) into the output folder (see output_names).
    Both are fetched before either is written, each is written whole or not at all, and
    when the overlay cannot be written the mask written just before it is removed, so a
    file reported as an error leaves no half result behind."""
    assert plan.out is not None
    plan.out.mkdir(parents=True, exist_ok=True)
    with plan.fetches:
        mask, *overlay = result_names(path, plan)
        results = {mask: job.mask_png()}
        if overlay:
            results[overlay[0]] = job.overlay_png()
    written: list[Path] = []
    try:
        for file_name, data in results.items():
            write_atomically(plan.out / file_name, data)
            written.append(plan.out / file_name)
    except BaseException:
        for done in written:
            done.unlink(missing_ok=True)
        raise


def run_all(files: list[Path], client: Client, plan: SubmitPlan, concurrency: int) -> list[Outcome]:
    """Submit every file, `plan.batch` per request, with a thread pool and a progress bar on
    stderr; the files of `plan.saved` get no outcome (see `submit_chunk`), and a batch of
    them alone is not sent."""
    stop = threading.Event()
    outcomes: list[Outcome] = []
    console = Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    pool = ThreadPoolExecutor(max_workers=concurrency)
    to_terminal = sys.stdout.isatty()  # asked before the progress bar wraps sys.stdout
    total = sum(path not in plan.saved for path in files)
    with Progress(*columns, console=console, disable=total < 2) as progress:
        drawn = progress.live.is_started and console.is_terminal  # the bar is on a terminal
        bar = console if drawn else None
        label = "waiting" if plan.waiting else "submitting"
        task = progress.add_task(label, total=total)
        # Cut from every file, the saved ones included, as the run that saved them cut them
        # (see `SubmitPlan.saved`).
        chunks = [files[i : i + plan.batch] for i in range(0, len(files), plan.batch)]
        chunks = [chunk for chunk in chunks if not plan.saved.issuperset(chunk)]
        futures = {pool.submit(submit_chunk, client, chunk, plan, stop): chunk for chunk in chunks}
        printed: dict[Future[list[Outcome]], int] = {}  # outcomes of each already reported
        unprinted: list[Outcome] = []  # reported once stdout was closed: not on it

        def report(future: Future[list[Outcome]]) -> None:
            """Print the chunk's outcomes not printed yet (a Ctrl-C may have cut a report
            short: the rest of it is printed once, from the handler)."""
            try:
                results = future.result()
            except Exception as exc:  # pragma: no cover - submit_chunk catches everything
                results = [
                    failed(Outcome(p), UnexpectedError(exc), stop, plan)
                    for p in futures[future]
                    if p not in plan.saved
                ]
            for outcome in results[printed.get(future, 0) :]:
                outcomes.append(outcome)
                printed[future] = printed.get(future, 0) + 1
                progress.advance(task)
                if unprinted:  # stdout is closed
                    unprinted.append(outcome)
                    continue
                try:
                    print_outcome(outcome, to_terminal, bar)
                except BrokenPipeError:
                    unprinted.append(outcome)
                    silence_stdout()
                    raise

        try:
            for future in as_completed(futures):
                report(future)
        except (KeyboardInterrupt, BrokenPipeError) as exc:
            # Ctrl-C (or SIGTERM: see `sigterm_as_interrupt`), or stdout's reader gone
            # (`| head -1`): send nothing more (not even retries); the requests in flight end
            # and their job ids are reported too, so nothing the server accepted goes
            # unreported (on stderr once stdout is closed).
            closed = isinstance(exc, BrokenPipeError)
            terminated = isinstance(exc, Terminated)
            halt(stop, plan, "stdout closed" if closed else "SIGTERM" if terminated else "Ctrl-C")
            client.stop_retries()
            pool.shutdown(wait=False, cancel_futures=True)
            try:
                for future in futures:
                    if not future.cancelled():
                        report(future)
            except (KeyboardInterrupt, BrokenPipeError):  # a second Ctrl-C: stop waiting
                pass
            raise Interrupted(outcomes, unprinted, terminated=terminated) from None
    pool.shutdown()
    return outcomes


def outcome_line(outcome: Outcome) -> bytes:
    """`job_id<TAB>status<TAB>file` for one file, the path as its own bytes (so a script can
    find a file whose name is not UTF-8), with backslash, tab, newline and carriage return in
    it written as \\\\, \\t, \\n and \\r, so each file is one line of three fields."""
    name = os.fsencode(outcome.path)
    for raw, escaped in ((b"\\", b"\\\\"), (b"\t", b"\\t"), (b"\n", b"\\n"), (b"\r", b"\\r")):
        name = name.replace(raw, escaped)
    return f"{outcome.job_id}\t{outcome.status}\t".encode() + name


def print_outcome(outcome: Outcome, to_terminal: bool, bar: Console | None) -> None:
    """Print the line of one file (outcome_line) on stdout.

    Into a file or a pipe it goes as bytes. On a terminal it goes as text, and while a
    progress bar is drawn on the terminal, through the bar's console, above the bar (bytes
    written past the bar landed on its line: `submitting ━━ 0/3 0:00:00<id>  queued  p0.png`)."""
    line = outcome_line(outcome)
    if not to_terminal:
        click.echo(line)
        return
    text = line.decode("utf-8", errors="backslashreplace")
    if bar is not None:
        bar.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def silence_stdout() -> None:
    """Point stdout at /dev/null once its reader is gone, so that no later write (nor the
    flush at exit) raises BrokenPipeError again (Python's documented recipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM: `terminated`) during `run_all`, or its stdout closed: the outcomes
    of the requests that were sent, and those that could not be printed on stdout (its
    reader was gone)."""

    def __init__(
        self,
        outcomes: list[Outcome],
        unprinted: list[Outcome] | None = None,
        *,
        terminated: bool = False,
    ) -> None:
        super().__init__("interrupted")
        self.outcomes = outcomes
        self.unprinted = unprinted or []
        self.terminated = terminated


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt (see `sigterm_as_interrupt`)."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside: SIGTERM (timeout(1), `docker stop`, a CI job canceled) stops the run as
    Ctrl-C does, raising Terminated (a KeyboardInterrupt) in the main thread, so the jobs the
    server took are still reported; its default action killed the process with nothing said
    of them. The handler found is put back on the way out. Outside the main thread (where
    no handler can be set) SIGTERM is left as it is."""

    def terminate(_signum: int, _frame: FrameType | None) -> None:
        raise Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def summary_table(outcomes: list[Outcome]) -> Table:
    """Counts per result and the mean latencies."""
    table = Table(title="segsvc submit")
    for name in ("result", "files", "mean latency", "mean predict"):
        table.add_column(name, justify="left" if name == "result" else "right")
    groups: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        groups.setdefault(outcome.status, []).append(outcome)
    for status, rows in sorted(groups.items()):
        lat = [o.latency_s for o in rows if o.latency_s is not None]
        pred = [o.predict_ms for o in rows if o.predict_ms is not None]
        table.add_row(
            status,
            str(len(rows)),
            f"{sum(lat) / len(lat):.2f} s" if lat else "-",
            f"{sum(pred) / len(pred):.0f} ms" if pred else "-",
        )
    return table


def submit_exit_code(outcomes: list[Outcome]) -> int:
    """Worst outcome wins: auth, then server/network, then failed jobs."""
    codes = {exit_code_for(o.error) for o in outcomes if o.error is not None}
    if any(o.status in ("failed", "canceled") for o in outcomes):
        codes.add(EXIT_FAILED)
    for code in (EXIT_AUTH, EXIT_SERVER, EXIT_FAILED):
        if code in codes:
            return code
    return EXIT_OK
