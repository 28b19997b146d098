"""Tests of the bulk-submit engine (segsvc/bulk_submit.py): file listing and naming, batches,
Ctrl-C; the `segsvc submit` command end to end is tested in test_client_cli.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.wrappers import Request, Response

from segsvc.bulk_submit import SubmitPlan, output_names, run_all
from segsvc.client import Client
from tests.conftest import sample_images
from tests.live import serve
from tests.segsvc.test_client import J1, Scripted


@pytest.fixture
def base_url(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    with serve(app) as url:
        yield url


def test_output_names_keep_results_of_files_with_the_same_stem_apart() -> None:
    from segsvc.bulk_submit import output_names

    files = [
        Path("in/a/cat.jpg"),
        Path("in/b/cat.jpg"),
        Path("in/a/dog.jpg"),
        Path("in/a/dog.png"),
        Path("in/a/solo.webp"),
    ]
    names = output_names(files)
    assert names[Path("in/a/solo.webp")] == "solo"  # no clash: the plain stem, as before
    assert names[Path("in/a/cat.jpg")] == "a_cat.jpg"  # the common folder "in" left out
    assert names[Path("in/b/cat.jpg")] == "b_cat.jpg"
    assert names[Path("in/a/dog.png")] == "a_dog.png"
    assert len(set(names.values())) == len(files)
    same_folder = output_names([Path("/x/y/dog.jpg"), Path("/x/y/dog.png")])
    assert sorted(same_folder.values()) == ["dog.jpg", "dog.png"]


@pytest.mark.parametrize(
    "files",
    [
        [Path("../photos/cat.jpg"), Path("photos/cat.jpg")],  # ".." is left out of a name
        [Path("a/b/cat.jpg"), Path("a_b/cat.jpg")],  # folders are joined with "_"
        [Path("a/Cat.jpg"), Path("b/cat.jpg")],  # one file on macOS and Windows
        [Path("x/Dog.jpg"), Path("x/dog.png"), Path("x/DOG.webp")],
    ],
)
def test_output_names_never_clash_even_case_folded(files: list[Path]) -> None:
    from segsvc.bulk_submit import output_names

    names = output_names(files)
    assert len({name.casefold() for name in names.values()}) == len(files), names


def test_image_files_lists_only_files(tmp_path: Path) -> None:
    from segsvc.bulk_submit import image_files

    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "real.jpg").write_bytes(b"x")
    assert image_files((tmp_path,)) == [tmp_path / "real.jpg"]


def test_image_files_lists_each_file_once(tmp_path: Path) -> None:
    """`segsvc submit photos/ photos/cat.jpg`: cat.jpg is sent once (it went twice: two jobs,
    and its results were named cat.jpg-2), where it first appears."""
    from segsvc.bulk_submit import image_files

    photos = tmp_path / "photos"
    photos.mkdir()
    cat, dog = photos / "cat.jpg", photos / "dog.jpg"
    for path in (cat, dog):
        path.write_bytes(b"x")
    (tmp_path / "same-cat.jpg").symlink_to(cat)
    again = photos / ".." / "photos" / "cat.jpg"
    listed = image_files((dog, photos, cat, again, tmp_path / "same-cat.jpg"))
    assert listed == [dog, cat]


@pytest.mark.timeout(30)
def test_image_files_searches_linked_folders_once_each(tmp_path: Path) -> None:
    """Regression: Path.rglob (Python 3.11) does not descend into a linked folder, so the
    photos under `photos/linked -> ../elsewhere` were silently not sent (linked files were).
    Linked folders are searched now, each folder once: a link to a folder above it (a loop)
    ends, and a folder reached by two paths is listed under the first, in name order."""
    from segsvc.bulk_submit import image_files

    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    (photos / "own").mkdir(parents=True)
    elsewhere.mkdir()
    for path in (photos / "own" / "a.jpg", elsewhere / "b.jpg", elsewhere / "c.mask.png"):
        path.write_bytes(b"x")
    (photos / "linked").symlink_to(elsewhere)
    (photos / "own" / "loop").symlink_to(photos)  # walked, it would never end
    (photos / "own" / "up").symlink_to(tmp_path)  # above: each folder in it searched once
    (photos / "z-again").symlink_to(photos / "own")  # "own" by another path
    skipped: list[Path] = []
    listed = image_files((photos,), None, skipped)
    assert listed == [photos / "linked" / "b.jpg", photos / "own" / "a.jpg"]
    assert skipped == [photos / "linked" / "c.mask.png"]  # results are still left out


def test_cli_a_file_that_cannot_be_read_fails_alone(
    base_url: str, api_key: str, tmp_path: Path
) -> None:
    """A file gone between listing and sending (or unreadable) is that file's error; the other
    files of its batch are still sent and reported."""
    from segsvc.bulk_submit import SubmitPlan, submit_chunk
    from segsvc.client_errors import ClientError

    good = tmp_path / "good.jpg"
    shutil.copy(sample_images(1)[0], good)
    missing = tmp_path / "missing.jpg"
    plan = SubmitPlan(False, None, False, None, None, 10.0, batch=2)
    from segsvc.client import Client

    with Client(base_url, api_key) as client:
        first, second = submit_chunk(client, [good, missing], plan, threading.Event())
    assert (first.path, first.status) == (good, "queued")
    assert first.job_id != "-"
    assert (second.path, second.status) == (missing, "error")
    assert isinstance(second.error, ClientError)
    assert "FileNotFoundError" in second.reason


def png_files(folder: Path, count: int) -> list[Path]:
    """`count` files p0.png, p1.png, ... (their bytes: the stub server reads none)."""
    files = [folder / f"p{i}.png" for i in range(count)]
    for path in files:
        path.write_bytes(b"png")
    return files


@pytest.fixture(autouse=True)
def _ctrl_c_raises() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt in these tests even where pytest started with SIGINT
    ignored (in the background of a script: Python then installs no handler of its own)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def interrupt_once_answered(stub: Scripted, count: int) -> threading.Thread:
    """A thread (to start) that sends this process Ctrl-C once `stub` has answered `count`
    requests, however slow the machine (a timer could fire before any was sent)."""

    def interrupt() -> None:
        deadline = time.monotonic() + 30
        while len(stub.times) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # the answer reaches its client
        os.kill(os.getpid(), signal.SIGINT)

    return threading.Thread(target=interrupt, daemon=True)


def test_cli_ctrl_c_stops_sending_and_reports_what_was_sent(tmp_path: Path) -> None:
    """Ctrl-C: no more requests start; every request that was answered is reported."""
    from segsvc.bulk_submit import Interrupted, SubmitPlan, run_all
    from segsvc.client import Client

    stub = Scripted([(202, {}, {"id": J1, "status": "queued"})], hold_s=0.2)
    files = png_files(tmp_path, 30)
    plan = SubmitPlan(False, None, False, None, None, 10.0, batch=1)
    timer = interrupt_once_answered(stub, 3)  # however slow the machine, some were sent first
    with serve(stub) as url, Client(url, "k") as client:
        timer.start()
        with pytest.raises(Interrupted) as stopped:
            run_all(files, client, plan, concurrency=2)
        sent = len(stub.times)
        time.sleep(0.5)  # nothing more goes out after the interrupt
        assert len(stub.times) == sent
    assert 0 < sent < 30
    assert len([o for o in stopped.value.outcomes if o.job_id != "-"]) == sent  # all reported


def test_cli_ctrl_c_while_waiting_reports_the_job_ids_at_once(tmp_path: Path) -> None:
    """Ctrl-C while `submit --wait` waits for jobs that do not end: the waits stop within a few
    seconds (not at --timeout) and every job the server took is reported with its id."""
    from segsvc.bulk_submit import Interrupted, SubmitPlan, run_all
    from segsvc.client import Client

    # a server whose jobs stay queued; it holds each answer 0.3 s
    stub = Scripted([(202, {}, {"id": J1, "status": "queued"})], hold_s=0.3)
    files = png_files(tmp_path, 3)
    plan = SubmitPlan(True, None, False, None, None, 60.0, batch=1)
    timer = interrupt_once_answered(stub, 6)  # the three submits and three polls: all wait
    with serve(stub) as url, Client(url, "k") as client:
        timer.start()
        started = time.monotonic()
        with pytest.raises(Interrupted) as stopped:
            run_all(files, client, plan, concurrency=3)
        took = time.monotonic() - started
    assert took < 10  # not the 60 s --timeout
    outcomes = stopped.value.outcomes
    assert [o.job_id for o in outcomes] == [J1] * 3
    assert all(o.status == "queued" and "Ctrl-C" in o.reason for o in outcomes)


def test_output_names_compare_unicode_normalised() -> None:
    """café typed two ways (NFC, NFD) is one name in a macOS folder: the results get two."""
    from segsvc.bulk_submit import output_names

    nfc, nfd = "caf\u00e9", "cafe\u0301"
    names = output_names([Path(f"a/{nfc}.jpg"), Path(f"b/{nfd}.jpg")])
    assert len({unicodedata.normalize("NFC", n).casefold() for n in names.values()}) == 2


def test_cli_ctrl_c_during_a_retry_pause_stops_at_once(tmp_path: Path) -> None:
    """A server that answers 503 Retry-After: 30 (its queue is full): Ctrl-C ends the pauses
    before the retries at once instead of after them."""
    from segsvc.bulk_submit import Interrupted, SubmitPlan, run_all
    from segsvc.client import Client

    busy = (503, {"Retry-After": "30"}, {"error": "queue_full", "message": "full"})
    stub = Scripted([busy])
    files = png_files(tmp_path, 4)
    plan = SubmitPlan(False, None, False, None, None, 10.0, batch=1)
    timer = interrupt_once_answered(stub, 2)  # both first tries were answered: both pause
    with serve(stub) as url, Client(url, "k", retries=5) as client:
        timer.start()
        started = time.monotonic()
        with pytest.raises(Interrupted) as stopped:
            run_all(files, client, plan, concurrency=2)
        assert time.monotonic() - started < 10  # not the 30 s pause
    assert len(stub.times) == 2  # the two first tries; no retry went out
    outcomes = stopped.value.outcomes
    assert len(outcomes) == 2
    assert all(o.status == "error" and "stopped" in o.reason for o in outcomes)


def test_image_files_leaves_out_the_results_of_an_earlier_run(tmp_path: Path) -> None:
    """`segsvc submit photos/ --out photos/masks/`, run again: its masks and overlays were
    sent as photos (each rerun adding p0.mask.mask.png, ...). A folder search now leaves out
    files named *.mask.png / *.overlay.png, and everything under --out inside the folder;
    a file named as such is still sent."""
    from segsvc.bulk_submit import image_files

    photos = tmp_path / "photos"
    masks = photos / "masks"
    masks.mkdir(parents=True)
    for path in (
        photos / "p0.png",
        photos / "p1.mask.png",  # results beside the photos (--out photos/)
        photos / "p1.OVERLAY.png",
        masks / "p0.mask.png",
        masks / "p0.overlay.png",
        masks / "keep.png",  # under --out, named otherwise (a renamed result)
    ):
        path.write_bytes(b"png")
    skipped: list[Path] = []
    assert image_files((photos,), masks, skipped) == [photos / "p0.png"]
    assert len(skipped) == 5
    assert image_files((photos,)) == [masks / "keep.png", photos / "p0.png"]
    # --out is the folder searched, or holds it: only the names tell results apart
    assert image_files((photos,), photos) == [masks / "keep.png", photos / "p0.png"]
    assert image_files((masks,), tmp_path) == [masks / "keep.png"]
    named = masks / "p0.mask.png"
    assert image_files((named,), masks) == [named]


def test_save_results_leaves_no_mask_when_the_overlay_cannot_be_written(tmp_path: Path) -> None:
    """Regression: the mask was written, then the overlay failed (here a folder in its way):
    the file was reported as an error, and its mask stayed in --out."""
    from segsvc.bulk_submit import SubmitPlan, save_results
    from segsvc.client import Client, Job

    out = tmp_path / "out"
    (out / "p0.overlay.png").mkdir(parents=True)
    plan = SubmitPlan(True, out, True, None, None, 10.0)
    with serve(Scripted([(200, {}, "overlay bytes")])) as url, Client(url, "k") as client:
        job = Job(client, {"id": J1, "status": "succeeded"}, mask_png=b"mask bytes")
        with pytest.raises(IsADirectoryError):
            save_results(job, tmp_path / "p0.png", plan)
    assert sorted(p.name for p in out.iterdir()) == ["p0.overlay.png"]  # the folder alone


def test_an_unreachable_server_stops_the_run_after_one_request(tmp_path: Path) -> None:
    """Regression: with a wrong --url every chunk ran its own series of retries, one after
    the other (minutes, hours for a large folder). Once one request has failed to reach the
    server through its retries, the files not yet sent are skipped, as after a 401."""
    import socket

    from segsvc.bulk_submit import EXIT_SERVER, SubmitPlan, run_all, submit_exit_code
    from segsvc.client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    files = png_files(tmp_path, 6)
    plan = SubmitPlan(False, None, False, None, None, 10.0, batch=1)
    started = time.monotonic()
    with Client(f"http://127.0.0.1:{port}", "k", retries=1) as client:
        outcomes = run_all(files, client, plan, concurrency=1)
    assert time.monotonic() - started < 3
    assert [o.status for o in outcomes] == ["error"] + ["skipped"] * 5
    assert "cannot connect" in outcomes[0].reason
    assert all("could not be reached" in o.reason for o in outcomes[1:])
    assert submit_exit_code(outcomes) == EXIT_SERVER


class Refusing:
    """A server that refuses every submit over a form field (422 validation_error, as it
    answers --webhook-events without --webhook), batch or single; counts the POSTs."""

    def __init__(self) -> None:
        self.posts: list[str] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        Request(environ).get_data()
        self.posts.append(environ["PATH_INFO"])
        body = {"error": "validation_error", "message": "'webhook_events' needs a 'webhook' URL."}
        return Response(json.dumps(body), status=422, mimetype="application/json")(
            environ, start_response
        )


def refusing_one(
    name: str, status: int, error: str, message: str, *, batch_prefix: str = ""
) -> Callable[[dict[str, Any], Any], Any]:
    """A server that refuses every batch and the file `name` sent alone (`status`, `error`,
    `message`; a batch's message after `batch_prefix` and the name, as `Image 1 (p1.png): `
    when it is given), and takes every other file."""

    def answer(environ: dict[str, Any], start_response: Any) -> Any:
        req = Request(environ)
        batch = req.path == "/v1/jobs/batch"
        prefix = f"{batch_prefix}({name}): " if batch and batch_prefix else ""
        if batch or [f.filename for f in req.files.getlist("image")] == [name]:
            code, body = status, {"error": error, "message": prefix + message}
        else:
            code, body = 202, {"id": J1, "status": "queued"}
        return Response(json.dumps(body), status=code, mimetype="application/json")(
            environ, start_response
        )

    return answer


@pytest.mark.parametrize("batch", [16, 1])
def test_a_refusal_that_would_hit_every_file_stops_the_run(tmp_path: Path, batch: int) -> None:
    """Regression: a batch refused over a field (not an image) was sent again file by file,
    each refused alike: one request per file in every chunk. Now the first file sent on its
    own that gets such a refusal stops the run."""
    from segsvc.bulk_submit import EXIT_FAILED, SubmitPlan, run_all, submit_exit_code
    from segsvc.client import Client

    stub = Refusing()
    files = png_files(tmp_path, 32)
    plan = SubmitPlan(False, None, False, None, ["start"], 10.0, batch=batch)
    with serve(stub) as url, Client(url, "k", retries=0) as client:
        outcomes = run_all(files, client, plan, concurrency=1)
    expected = ["/v1/jobs/batch", "/v1/jobs"] if batch > 1 else ["/v1/jobs"]
    assert stub.posts == expected
    assert [o.status for o in outcomes] == ["error"] + ["skipped"] * 31
    assert "needs a 'webhook' URL" in outcomes[0].reason
    assert all("refuses every file alike" in o.reason for o in outcomes[1:])
    assert submit_exit_code(outcomes) == EXIT_FAILED


def test_a_batch_refused_over_one_image_still_sends_every_other_file(tmp_path: Path) -> None:
    """A refusal that names an image (`Image 1 (p1.png): ...`) is that file's: the others
    are sent on their own and taken."""
    from segsvc.bulk_submit import SubmitPlan, run_all
    from segsvc.client import Client

    answer = refusing_one(
        "p1.png", 422, "invalid_image", "The image could not be decoded.", batch_prefix="Image 1 "
    )
    files = png_files(tmp_path, 3)
    plan = SubmitPlan(False, None, False, None, None, 10.0, batch=3)
    with serve(answer) as url, Client(url, "k", retries=0) as client:
        outcomes = run_all(files, client, plan, concurrency=1)
    assert [o.status for o in outcomes] == ["queued", "error", "queued"]


def test_cli_ctrl_c_while_the_server_stalls_stops_waiting_at_once(tmp_path: Path) -> None:
    """Ctrl-C while a wait's request is stalled (a proxy that holds it, a hung server): the
    run stops within the ~2 s the docs promise, not when the request ends (the client's
    timeout plus the hold: 32 s by default)."""
    from segsvc.bulk_submit import Interrupted, SubmitPlan, run_all
    from segsvc.client import Client
    from tests.segsvc.test_client import Stalled

    stub = Stalled(5.0)
    files = png_files(tmp_path, 2)
    plan = SubmitPlan(True, None, False, None, None, 60.0, batch=1)

    interrupted: list[float] = []

    def interrupt() -> None:  # once both waits' requests are in flight
        deadline = time.monotonic() + 30
        while stub.received.count("GET") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        interrupted.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    with serve(stub) as url, Client(url, "k") as client:
        threading.Thread(target=interrupt, daemon=True).start()
        with pytest.raises(Interrupted) as stopped:
            run_all(files, client, plan, concurrency=2)
        took = time.monotonic() - interrupted[0]
    assert took < 2.0, f"stopped {took:.1f}s after Ctrl-C"
    outcomes = stopped.value.outcomes
    assert [o.job_id for o in outcomes] == [J1] * 2
    assert all(o.status == "queued" and "Ctrl-C" in o.reason for o in outcomes)


def test_a_batch_too_large_whose_first_file_is_too_large_too_does_not_stop_the_run(
    tmp_path: Path,
) -> None:
    """A batch over the server's size limit and a file over the single limit get the same
    413 (the server's generic answer): that is the file's error, the others are still sent."""
    from segsvc.bulk_submit import SubmitPlan, run_all
    from segsvc.client import Client

    answer = refusing_one("p0.png", 413, "payload_too_large", "The data value transmitted exceeds")
    files = png_files(tmp_path, 3)
    plan = SubmitPlan(False, None, False, None, None, 10.0, batch=3)
    with serve(answer) as url, Client(url, "k", retries=0) as client:
        outcomes = run_all(files, client, plan, concurrency=1)
    assert [o.status for o in outcomes] == ["error", "queued", "queued"]


def test_each_file_of_a_batch_reports_when_its_job_was_seen_ended(tmp_path: Path) -> None:
    """One long poll answered a batch's four jobs ended, yet each file's latency was stamped
    after the downloads of the files before it: 0.0, 0.5, 1.0, 1.5 s for results seen at once,
    so the summary's mean latency grew with the batch size."""
    from segsvc.bulk_submit import SubmitPlan, submit_chunk
    from segsvc.client import Client

    ids = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 5)]

    def stub(environ: dict[str, Any], start_response: Any) -> Any:
        req = Request(environ)
        req.get_data()
        if req.path == "/v1/jobs/batch":
            body: Any = {"jobs": [{"id": i, "status": "queued"} for i in ids]}
            resp = Response(json.dumps(body), status=202, mimetype="application/json")
        elif req.path == "/v1/jobs":
            jobs = [{"id": i, "status": "succeeded", "metrics": {"predict_ms": 5}} for i in ids]
            body = {"jobs": jobs, "not_found": []}
            resp = Response(json.dumps(body), mimetype="application/json")
        else:  # mask.png: a slow download (a large mask, a slow link)
            time.sleep(0.3)
            resp = Response(b"png", mimetype="image/png")
        return resp(environ, start_response)

    files = [tmp_path / f"p{i}.png" for i in range(4)]
    for path in files:
        path.write_bytes(b"png")
    plan = SubmitPlan(True, tmp_path / "out", False, None, None, 30.0, batch=4)
    with serve(stub) as url, Client(url, "k") as client:
        outcomes = submit_chunk(client, files, plan, threading.Event())
    assert [o.status for o in outcomes] == ["succeeded"] * 4
    latencies = [o.latency_s or 0.0 for o in outcomes]
    assert max(latencies) - min(latencies) < 0.1, latencies
    assert all((tmp_path / "out" / f"p{i}.mask.png").is_file() for i in range(4))


def test_results_are_fetched_at_most_four_at_a_time(tmp_path: Path) -> None:
    """However many requests are in flight (`-j 12`), at most 4 result downloads run at once:
    the server decodes the photo for each overlay and queues only a few per key."""
    lock, active, peak, gets = threading.Lock(), [0], [0], [0]

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        request.get_data()
        if request.method == "POST":
            body = {"id": str(uuid.uuid4()), "status": "succeeded"}
            return Response(json.dumps(body), 201, mimetype="application/json")(
                environ, start_response
            )
        with lock:
            active[0] += 1
            gets[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.15)
        with lock:
            active[0] -= 1
        return Response(b"png", 200, mimetype="image/png")(environ, start_response)

    files = png_files(tmp_path, 12)
    out = tmp_path / "out"
    plan = SubmitPlan(True, out, True, None, None, 30.0, batch=1)
    plan.names = output_names(files)
    with serve(app) as url, Client(url, "k", retries=0) as client:
        outcomes = run_all(files, client, plan, concurrency=12)
    assert [o.status for o in outcomes] == ["succeeded"] * 12
    assert gets[0] == 24  # a mask and an overlay each
    assert 2 <= peak[0] <= 4, peak[0]
    assert len(list(out.iterdir())) == 24
