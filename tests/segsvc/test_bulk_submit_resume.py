"""`segsvc submit` against the real API: no file lost to the rate limit, a 408 or a 503 on
the way, and a rerun that does not submit the same files twice (content-derived
Idempotency-Keys)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import func, select
from werkzeug.wrappers import Request, Response

from segsvc.bulk_submit import EXIT_SERVER, SubmitPlan, run_all, submit_exit_code
from segsvc.client import Client
from segsvc.db import session_scope
from segsvc.models import Job
from segsvc.settings import Settings
from tests.live import serve
from tests.segsvc.test_client_retries import OnceTimedOut


@pytest.fixture
def base_url(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    with serve(app) as url:
        yield url


def png(color: tuple[int, int, int] = (120, 80, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, format="PNG")
    return buf.getvalue()


def photos(folder: Path, count: int) -> list[Path]:
    files = []
    for i in range(count):
        path = folder / f"p{i:03d}.png"
        path.write_bytes(png((i % 250, 80, 40)))
        files.append(path)
    return files


def job_count(settings: Settings) -> int:
    with session_scope(settings) as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


@pytest.mark.timeout(120)
def test_default_bulk_submit_of_320_photos_sends_every_file(
    base_url: str, api_key: str, tmp_path: Path
) -> None:
    """Regression (rev3a): past the rate limit's burst, the batches waiting for tokens used
    up their retries on 429s and 64 of 479 files were lost."""
    files = photos(tmp_path, 320)
    plan = SubmitPlan(False, None, False, None, None, 300.0, batch=16)  # the CLI's defaults
    with Client(base_url, api_key) as client:
        outcomes = run_all(files, client, plan, concurrency=4)
    refused = [o.reason for o in outcomes if o.status != "queued"]
    assert not refused, f"{len(refused)} of 320 not sent: {refused[0]}"


def test_one_408_does_not_turn_the_rest_of_the_run_into_single_submits(tmp_path: Path) -> None:
    files = []
    for i in range(48):
        path = tmp_path / f"p{i:02d}.png"
        path.write_bytes(b"png")
        files.append(path)
    stub = OnceTimedOut()
    plan = SubmitPlan(False, None, False, None, None, 10.0, batch=16)
    with serve(stub) as url, Client(url, "k", retries=3) as client:
        outcomes = run_all(files, client, plan, concurrency=1)
    assert [o.status for o in outcomes] == ["queued"] * 48
    assert stub.posts.count("/v1/jobs") == 0
    assert not plan.batches_refused.is_set()


@pytest.mark.parametrize("batch", [1, 4])
def test_a_rerun_of_the_same_folder_creates_no_new_jobs(
    base_url: str, api_key: str, settings: Settings, tmp_path: Path, batch: int
) -> None:
    """Regression (rev3a): each submit had a random Idempotency-Key, so rerunning an
    interrupted `segsvc submit` submitted every file again."""
    files = photos(tmp_path, 10)
    first_ids: list[str] = []
    for run in range(2):
        plan = SubmitPlan(False, None, False, None, None, 10.0, batch=batch)
        with Client(base_url, api_key) as client:
            outcomes = run_all(files, client, plan, concurrency=2)
        assert [o.status for o in outcomes] == ["queued"] * 10
        ids = [o.job_id for o in sorted(outcomes, key=lambda o: o.path)]
        if run == 0:
            first_ids = ids
        assert ids == first_ids
    assert job_count(settings) == 10


def test_a_changed_file_or_other_webhook_gets_a_new_job(
    api_key: str, settings: Settings, tmp_path: Path
) -> None:
    from api.app import create_app

    files = photos(tmp_path, 3)
    hooks = settings.model_copy(update={"webhook_allow_networks": "127.0.0.0/8"})

    def run(webhook: str | None = None) -> dict[str, str]:
        plan = SubmitPlan(False, None, False, webhook, None, 10.0, batch=1)
        with serve(create_app(hooks)) as url, Client(url, api_key) as client:
            outcomes = run_all(files, client, plan, concurrency=1)
        assert [o.status for o in outcomes] == ["queued"] * 3, [o.reason for o in outcomes]
        return {o.path.name: o.job_id for o in outcomes}

    first = run()
    files[1].write_bytes(png((1, 2, 3)))  # another photo under the same name
    second = run()
    assert job_count(settings) == 4
    assert second["p001.png"] != first["p001.png"]
    assert second["p000.png"] == first["p000.png"]
    run("http://127.0.0.1:9/hook")  # another body: new keys, not a 422
    assert job_count(settings) == 7


class Unavailable:
    """Answers every submit with 503 database_unavailable; counts the POSTs."""

    def __init__(self) -> None:
        self.posts: list[str] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        Request(environ).get_data()
        self.posts.append(environ["PATH_INFO"])
        body = {"error": "database_unavailable", "message": "The database is unavailable."}
        headers = {"Retry-After": "0"}
        return Response(json.dumps(body), 503, headers, mimetype="application/json")(
            environ, start_response
        )


def test_a_503_through_the_retries_stops_the_run(tmp_path: Path) -> None:
    files = photos(tmp_path, 48)
    stub = Unavailable()
    plan = SubmitPlan(False, None, False, None, None, 10.0, batch=16)
    with serve(stub) as url, Client(url, "k", retries=1) as client:
        outcomes = run_all(files, client, plan, concurrency=1)
    assert len(stub.posts) == 2  # one batch and its retry, nothing after it
    assert [o.status for o in outcomes] == ["error"] * 16 + ["skipped"] * 32
    assert "unavailable" in outcomes[-1].reason
    assert submit_exit_code(outcomes) == EXIT_SERVER


def test_a_run_with_again_submits_the_same_files_as_new_jobs(
    base_url: str, api_key: str, settings: Settings, tmp_path: Path
) -> None:
    """`--again` (a new model since, say): the files become new jobs, each run's own keys."""
    files = photos(tmp_path, 3)
    for again in (None, "run-2", "run-3"):
        plan = SubmitPlan(False, None, False, None, None, 10.0, batch=1)
        plan.again = again
        with Client(base_url, api_key) as client:
            outcomes = run_all(files, client, plan, concurrency=1)
        assert [o.status for o in outcomes] == ["queued"] * 3
    assert job_count(settings) == 9


def stored_ids(settings: Settings) -> set[str]:
    with session_scope(settings) as session:
        return {str(job_id) for job_id in session.scalars(select(Job.id))}


@pytest.mark.timeout(120)
def test_a_resume_with_skip_existing_stores_no_new_job(
    base_url: str, api_key: str, settings: Settings, tmp_path: Path
) -> None:
    """Regression (rev): `--skip-existing` dropped the files with results before cutting the
    batches, so every batch after the first saved file held other files than in the run it
    resumed, got another Idempotency-Key, and the server stored its files again as new jobs.
    Here the saved results are not whole leading batches (one file of the first batch, one
    in the middle of the second, the whole third, one of the fourth), and a broken file
    first makes the first batch go one by one, in both runs: the resume stores no job."""
    from click.testing import CliRunner

    from segsvc.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a-broken.png").write_text("not an image")  # sorts first: batch 1 goes singly
    files = photos(folder, 11)  # p000..p010: batches of 3 with the broken file first
    out = tmp_path / "out"
    env = {"SEG_URL": base_url, "SEG_API_KEY": api_key, "COLUMNS": "200"}
    # No worker: the jobs stay queued, each batch's wait ends after --timeout 1
    args = ["submit", str(folder), "--out", str(out), "-b", "3", "-j", "2", "--timeout", "1"]

    def run(*extra: str) -> dict[str, tuple[str, str]]:
        result = CliRunner().invoke(main, [*args, *extra], env=env, catch_exceptions=False)
        assert result.exit_code == 1, result.output  # the broken file, the waits timed out
        rows = [line.split("\t") for line in result.stdout.splitlines()]
        assert len(rows) == 12, rows  # one line per file
        return {Path(name).name: (job_id, status) for job_id, status, name in rows}

    first = run()
    assert first.pop("a-broken.png") == ("-", "error")
    assert all(job_id != "-" for job_id, _ in first.values())  # taken; the waits timed out
    before = stored_ids(settings)
    assert len(before) == 11

    # What an interrupted run saved, as `save_results` names them (p001 of batch 1, ...)
    saved = {files[i].name for i in (1, 3, 5, 6, 7, 9)}
    out.mkdir(exist_ok=True)
    for name in saved:
        (out / name.replace(".png", ".mask.png")).write_bytes(png())
    second = run("--skip-existing")

    assert stored_ids(settings) == before  # no new job: every batch was replayed
    for name, (job_id, status) in second.items():
        if name in saved:
            assert (job_id, status) == ("-", "exists")
        elif name == "a-broken.png":
            assert (job_id, status) == ("-", "error")
        else:  # the same job as in the first run
            assert (job_id, status) == (first[name][0], "error"), name  # its wait timed out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        name.replace(".png", ".mask.png") for name in saved
    )
