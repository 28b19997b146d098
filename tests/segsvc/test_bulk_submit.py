"""Tests of the bulk-submit engine (segsvc/bulk_submit.py): file listing and naming, batches,
Ctrl-C; the `segsvc submit` command end to end is tested in test_client_cli.py."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

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
