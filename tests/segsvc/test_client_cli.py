"""`segsvc submit/status/get/cancel` and `segsvc client ...` against a live API."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from PIL import Image, ImageOps

from segsvc.cli import main
from segsvc.settings import Settings, get_settings
from tests.conftest import sample_images
from tests.live import serve
from tests.segsvc.test_bulk_submit import png_files
from tests.segsvc.test_client import J1, Scripted


@pytest.fixture
def base_url(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    with serve(app) as url:
        yield url


def cli(*args: str, url: str, key: str | None = "", **env: str) -> Result:
    """Run `segsvc ARGS` with the URL and key in the environment, as a user would."""
    environ = {"SEG_URL": url, "SEG_API_KEY": key or "", "COLUMNS": "120", **env}
    return CliRunner().invoke(main, list(args), env=environ, catch_exceptions=False)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_cli_submit_dir_waits_saves_and_gets(
    base_url: str, api_key: str, worker: Path, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for photo in sample_images(3):
        shutil.copy(photo, photos / photo.name)
    out = tmp_path / "out"
    result = cli(
        "submit", str(photos), "--out", str(out), "--overlay", "-j", "2", url=base_url, key=api_key
    )
    assert result.exit_code == 0, (result.output, worker.read_text()[-2000:])
    lines = [ln.split("\t") for ln in result.stdout.splitlines() if "\t" in ln]
    assert len(lines) == 3
    assert {status for _, status, _ in lines} == {"succeeded"}
    assert "succeeded" in result.stderr
    assert "mean latency" in result.stderr
    for photo in photos.iterdir():
        with Image.open(photo) as src, Image.open(out / f"{photo.stem}.mask.png") as mask:
            assert mask.size == ImageOps.exif_transpose(src).size
        assert (out / f"{photo.stem}.overlay.png").stat().st_size > 0

    job_id = lines[0][0]
    status = cli("client", "status", job_id, url=base_url, key=api_key)
    assert status.exit_code == 0
    assert "succeeded" in status.stdout
    target = tmp_path / "one.png"
    got = cli("get", job_id, "--out", str(target), "--overlay", url=base_url, key=api_key)
    assert got.exit_code == 0, got.output
    with Image.open(target) as img:
        assert img.mode == "RGB"


def test_cli_exit_codes_for_auth_refusal_and_usage(
    base_url: str, api_key: str, tmp_path: Path
) -> None:
    photo = sample_images(1)[0]
    denied = cli("submit", str(photo), url=base_url, key="seg_wrong")
    assert denied.exit_code == 4
    assert "API key" in denied.stderr
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not really a jpeg")
    refused = cli("submit", str(junk), url=base_url, key=api_key)
    assert refused.exit_code == 1
    assert "error" in refused.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("submit", str(empty), url=base_url, key=api_key).exit_code == 2
    unknown = cli("status", "00000000-0000-0000-0000-000000000000", url=base_url, key=api_key)
    assert unknown.exit_code == 1
    assert "404" in unknown.stderr


def test_cli_batch_with_a_bad_file_sends_each_file_on_its_own(
    base_url: str, api_key: str, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for photo in sample_images(3):
        shutil.copy(photo, photos / photo.name)
    (photos / "broken.jpg").write_bytes(b"not really a jpeg")
    result = cli("submit", str(photos), "--batch", "16", url=base_url, key=api_key)
    assert result.exit_code == 1, result.output
    rows = {
        Path(name).name: (job_id, status)
        for job_id, status, name in (ln.split("\t") for ln in result.stdout.splitlines())
    }
    assert len(rows) == 4
    assert rows.pop("broken.jpg") == ("-", "error")
    assert {status for _, status in rows.values()} == {"queued"}  # the good ones still went in
    assert "broken.jpg" in result.stderr
    queued = {job_id for job_id, _ in rows.values()}
    assert len(queued) == 3
    for job_id in queued:  # stored once each: the refused batch left nothing behind
        assert cli("status", job_id, url=base_url, key=api_key).exit_code == 0


def test_cli_sends_files_in_batches_of_the_size_asked(
    app,
    api_key: str,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    seen: list[int] = []
    photos = tmp_path / "photos"
    photos.mkdir()
    for photo in sample_images(5):
        shutil.copy(photo, photos / photo.name)

    def counting(environ: dict[str, object], start_response: object) -> object:
        if environ["REQUEST_METHOD"] == "POST":
            seen.append(1 if environ["PATH_INFO"] == "/v1/jobs" else -1)
        return app(environ, start_response)

    with serve(counting) as url:
        result = cli("submit", str(photos), "-b", "2", "-j", "1", url=url, key=api_key)
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 5
    assert sorted(seen) == [-1, -1, 1]  # two batches of 2, then the last file on its own


def test_cli_stops_batching_when_the_server_refuses_batches_it_cannot_take(
    settings: Settings, api_key: str, tmp_path: Path
) -> None:
    from api.app import create_app

    photos = tmp_path / "photos"
    photos.mkdir()
    for photo in sample_images(8):
        shutil.copy(photo, photos / photo.name)
    app = create_app(settings.model_copy(update={"batch_submit_max_images": 2}))
    batches: list[str] = []

    def counting(environ: dict[str, object], start_response: object) -> object:
        if environ["PATH_INFO"] == "/v1/jobs/batch":
            batches.append(str(environ["PATH_INFO"]))
        return app(environ, start_response)

    with serve(counting) as url:
        result = cli("submit", str(photos), "-b", "4", "-j", "1", url=url, key=api_key)
    assert result.exit_code == 0, result.output
    assert [status for _, status, _ in (ln.split("\t") for ln in result.stdout.splitlines())] == [
        "queued"
    ] * 8
    assert len(batches) == 1  # refused once (4 > 2), then every file went on its own


def test_cli_unreachable_server_exits_3() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = cli("status", J1, url=f"http://127.0.0.1:{port}", key="k", SEG_RETRIES="1")
    assert result.exit_code == 3
    assert "cannot connect" in result.stderr


def test_cli_cancel_queued_job_then_status_exits_1(base_url: str, api_key: str) -> None:
    submitted = cli("submit", str(sample_images(1)[0]), url=base_url, key=api_key)
    assert submitted.exit_code == 0
    job_id, state, _ = submitted.stdout.splitlines()[0].split("\t")
    assert state == "queued"
    canceled = cli("cancel", job_id, url=base_url, key=api_key)
    assert canceled.exit_code == 0
    assert "canceled" in canceled.stdout
    assert cli("status", job_id, "--json", url=base_url, key=api_key).exit_code == 1


def test_cli_reads_key_file_when_no_key_given(
    base_url: str, api_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "local_api_key").write_text(api_key + "\n")
    monkeypatch.setenv("SEG_VAR_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        result = cli(
            "submit", str(sample_images(1)[0]), url=base_url, key=None, SEG_VAR_DIR=str(tmp_path)
        )
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output


def test_cli_models_list_table_and_missing_endpoint() -> None:
    rows = [
        {
            "version": "v7",
            "status": "production",
            "traffic_share": 1.0,
            "metrics": {"mean_iou": 0.71},
        }
    ]
    with serve(Scripted([(200, {}, {"versions": rows, "training_runs": []})])) as url:
        listed = cli("client", "models", "list", url=url, key="k")
    assert listed.exit_code == 0
    assert "v7" in listed.stdout
    assert "0.710" in listed.stdout
    with serve(Scripted([(404, {}, {"error": "not_found", "message": "no"})])) as url:
        missing = cli("client", "models", "list", url=url, key="k")
    assert missing.exit_code == 3
    assert "segsvc models list" in missing.stderr


def test_cli_models_list_json_is_the_raw_answer() -> None:
    """`models list --json` prints GET /v1/models as it came (the training runs were dropped)."""
    import json

    body = {"versions": [{"version": "v7", "status": "production"}], "training_runs": [{"id": 3}]}
    with serve(Scripted([(200, {}, body)])) as url:
        listed = cli("client", "models", "list", "--json", url=url, key="k")
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout) == body


def test_cli_models_list_from_live_api(
    base_url: str, admin_key: str, api_key: str, production_model: str
) -> None:
    listed = cli("client", "models", "list", url=base_url, key=admin_key)
    assert listed.exit_code == 0, listed.output
    assert production_model in listed.stdout
    assert "production" in listed.stdout
    assert cli("client", "models", "list", url=base_url, key=api_key).exit_code == 4


def test_cli_get_into_a_missing_folder_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    done = {"id": J1, "status": "succeeded"}
    stub = Scripted([(200, {}, done), (200, {}, "not really a png")])
    with serve(stub) as url:
        result = cli("client", "get", J1, "--out", str(tmp_path / "gone" / "m.png"), url=url)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "error: " in result.output
    assert "FileNotFoundError" in result.output
    assert "Traceback" not in result.output


def test_cli_a_file_name_that_is_not_utf8_does_not_stop_the_run(
    base_url: str, api_key: str, tmp_path: Path
) -> None:
    """A Latin-1 file name among UTF-8 ones: every file is still sent and reported, alone or in
    a batch (it used to end the run with a traceback and no ids for the jobs already taken)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    sources = sample_images(3)
    names = [b"caf\xe9.jpg", b"dog.jpg", b"zebra.jpg"]
    for source, name in zip(sources, names, strict=True):
        shutil.copy(source, os.fsdecode(bytes(photos) + b"/" + name))
    for batch in ("1", "3"):
        result = cli("submit", str(photos), "-b", batch, "-j", "2", url=base_url, key=api_key)
        assert result.exit_code == 0, result.output
        rows = [line.split("\t") for line in result.stdout.splitlines()]
        assert len(rows) == 3
        assert all(status == "queued" and job_id != "-" for job_id, status, _ in rows)


def test_cli_a_result_that_cannot_be_fetched_leaves_no_file(tmp_path: Path) -> None:
    """The mask came, the overlay did not (a 404 here): nothing is written for that file, so
    a file reported as an error has no half result in --out."""
    done = (200, {}, {"id": J1, "status": "succeeded"})
    gone = (404, {}, {"error": "not_found", "message": "No such job."})
    # submit (finished at once), then the mask (any bytes), then the overlay: 404
    stub = Scripted([done, (200, {}, "mask bytes"), gone])
    photo = png_files(tmp_path, 1)[0]
    out = tmp_path / "out"
    with serve(stub) as url:
        result = cli("submit", str(photo), "--out", str(out), "--overlay", url=url, SEG_RETRIES="0")
    assert result.exit_code == 1, result.output
    assert list(out.iterdir()) == []


def test_cli_summary_prints_file_names_with_brackets_as_they_are(tmp_path: Path) -> None:
    """File names and server messages are text, not rich markup: `cat [final].png` is shown as
    it is, and `b].png` in a folder `x[` does not end the run with a MarkupError."""
    refused = (422, {}, {"error": "invalid_image", "message": "not an [image]"})
    folder = tmp_path / "x["
    folder.mkdir()
    for name in ("cat [final].png", "b].png"):  # the second's path holds "[/b]"
        (folder / name).write_bytes(b"png")
    with serve(Scripted([refused])) as url:
        result = cli("submit", str(folder), "-b", "1", url=url, SEG_RETRIES="0")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "cat [final].png: not an [image]" in result.stderr
    assert "x[/b].png" in result.stderr


def test_cli_cancel_retried_after_it_went_through_and_of_an_ended_job(tmp_path: Path) -> None:
    ended = (409, {}, {"error": "conflict", "message": "Job j1 is already canceled."})
    with serve(Scripted([ended, (200, {}, {"id": J1, "status": "canceled"})])) as url:
        result = cli("cancel", J1, url=url)
    assert result.exit_code == 0, result.output
    assert f"{J1}  canceled" in result.stdout
    with serve(Scripted([ended, (200, {}, {"id": J1, "status": "succeeded"})])) as url:
        result = cli("cancel", J1, url=url)
    assert result.exit_code == 1
    assert "already succeeded" in result.stderr


@pytest.mark.parametrize("command", [["status"], ["cancel"], ["client", "get"]])
def test_cli_a_job_id_that_is_not_a_uuid_is_a_usage_error_and_sends_nothing(
    command: list[str],
) -> None:
    stub = Scripted([(200, {}, {"id": J1, "status": "canceled"})])
    with serve(stub) as url:
        result = cli(*command, "../models/rollback?", url=url)
    assert result.exit_code == 2, result.output
    assert "'../models/rollback?' is not a job id (a UUID)" in result.stderr
    assert "Traceback" not in result.output
    assert stub.times == []


def test_cli_get_writes_to_a_pipe_as_it_is(tmp_path: Path) -> None:
    """`segsvc get -o /dev/stdout` (or a named pipe): a temporary file renamed over it cannot
    work there, so such a target is written directly."""
    import threading as threads

    done = {"id": J1, "status": "succeeded"}
    pipe = tmp_path / "mask.fifo"
    os.mkfifo(pipe)
    got: list[bytes] = []
    reader = threads.Thread(target=lambda: got.append(pipe.read_bytes()))
    reader.start()
    with serve(Scripted([(200, {}, done), (200, {}, "png bytes")])) as url:
        result = cli("client", "get", J1, "--out", str(pipe), url=url)
    reader.join(10)
    assert result.exit_code == 0, result.output
    assert got == [b'"png bytes"']  # the stub's JSON-encoded body, as the CLI received it
    assert pipe.exists()  # still the pipe, not replaced by a file
    assert not pipe.is_file()


def run_in_terminal(args: list[str], url: str, timeout: float = 60.0) -> tuple[int, bytes]:
    """Run `segsvc ARGS` with stdout and stderr on one pseudo-terminal, as in a shell window;
    returns its exit code and every byte the terminal got."""
    import pty
    import select
    import subprocess
    import sys

    master, slave = pty.openpty()
    env = {**os.environ, "SEG_URL": url, "SEG_API_KEY": "k", "COLUMNS": "100", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "segsvc.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    received = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal's last writer is gone
                break
            if not chunk:
                break
            received += chunk
    finally:
        os.close(master)
        code = proc.wait(10)
    return code, received


def screen_lines(received: bytes) -> list[str]:
    """What a terminal shows of each line: colours dropped, and a line redrawn after `\\r` or
    an erase (`ESC [2K`) shows only what came after it."""
    import re

    text = re.sub(
        r"\x1b\[[0-9;?]*[A-Za-z]", lambda m: "\r" if m[0] == "\x1b[2K" else "", received.decode()
    )
    return [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]


def test_cli_submit_on_a_terminal_prints_each_line_above_the_progress_bar(
    tmp_path: Path,
) -> None:
    """stdout and stderr on one terminal: each `job_id  status  file` line is a line of its own
    (it used to be written past the bar: `submitting ━━ 0/3 0:00:00<id>  queued  p0.png`)."""
    files = png_files(tmp_path, 3)
    stub = Scripted([(202, {}, {"id": J1, "status": "queued"})], hold_s=0.3)
    with serve(stub) as url:
        code, received = run_in_terminal(["submit", "-b", "1", "-j", "1", *map(str, files)], url)
    assert code == 0, received
    shown = [line for line in screen_lines(received) if J1 in line]
    assert len(shown) == 3, shown
    assert all(line.startswith(J1) for line in shown), shown
    assert {line.split()[-1] for line in shown} == {str(path) for path in files}


def test_cli_get_into_a_link_writes_the_links_target(tmp_path: Path) -> None:
    """`segsvc get -o latest.png` where latest.png is a link: the file it points to gets the
    mask and the link stays (a temporary file was renamed over the link itself)."""
    done = {"id": J1, "status": "succeeded"}
    real = tmp_path / "masks" / "v1.png"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "latest.png"
    link.symlink_to(real)
    with serve(Scripted([(200, {}, done), (200, {}, "png bytes")])) as url:
        result = cli("client", "get", J1, "--out", str(link), url=url)
    assert result.exit_code == 0, result.output
    assert link.is_symlink()
    assert real.read_bytes() == b'"png bytes"'
    assert result.stdout == f"{link}\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="making another user's link needs root")
def test_cli_get_into_another_users_link_replaces_the_link(tmp_path: Path) -> None:
    """In a shared folder anyone may leave `mask.png -> /etc/shadow` for the next `get -o
    mask.png`: a link the user does not own is replaced by the file, its target left alone."""
    done = {"id": J1, "status": "succeeded"}
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "mask.png"
    link.symlink_to(victim)
    os.lchown(link, 12345, 12345)  # another user's
    with serve(Scripted([(200, {}, done), (200, {}, "png bytes")])) as url:
        result = cli("client", "get", J1, "--out", str(link), url=url)
    assert result.exit_code == 0, result.output
    assert victim.read_bytes() == b"precious"
    assert not link.is_symlink()
    assert link.read_bytes() == b'"png bytes"'


def test_cli_get_to_stdout_writes_the_image_alone(tmp_path: Path) -> None:
    """`-o -`, and `-o /dev/stdout` (here /proc/self/fd/1) with stdout redirected to a file:
    the image goes to stdout and nothing follows it (its name after the PNG spoilt it; and
    /dev/stdout, a link to the file, was replaced by a renamed temporary file or refused)."""
    import subprocess
    import sys

    done = {"id": J1, "status": "succeeded"}
    with serve(Scripted([(200, {}, done), (200, {}, "png bytes")])) as url:
        dashed = cli("client", "get", J1, "-o", "-", url=url)
    assert dashed.exit_code == 0, dashed.output
    assert dashed.stdout_bytes == b'"png bytes"'
    assert not (Path.cwd() / "-").exists()

    saved = tmp_path / "mask.png"
    env = {**os.environ, "SEG_API_KEY": "k"}
    with serve(Scripted([(200, {}, done), (200, {}, "png bytes")])) as url, saved.open("wb") as fh:
        ran = subprocess.run(
            [sys.executable, "-m", "segsvc.cli", "get", J1, "-o", "/proc/self/fd/1", "--url", url],
            stdout=fh,
            stderr=subprocess.PIPE,
            env=env,
            timeout=60,
            check=False,
        )
    assert ran.returncode == 0, ran.stderr
    assert saved.read_bytes() == b'"png bytes"'


def test_cli_submit_into_a_closed_pipe_stops_and_reports_on_stderr(tmp_path: Path) -> None:
    """`segsvc submit photos/ | head -1`: once the reader is gone nothing more is sent, the
    jobs taken whose lines could not go to stdout are listed on stderr, and it exits 141 as
    SIGPIPE would (a BrokenPipeError traceback and exit 1, with every file still sent)."""
    import subprocess
    import sys

    class AfterTheReaderLeft(Scripted):
        """Answers the first submit at once and every later one once the reader is gone."""

        gone = threading.Event()

        def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            if self.times:
                self.gone.wait(30)
            return super().__call__(environ, start_response)

    files = png_files(tmp_path, 8)
    stub = AfterTheReaderLeft([(202, {}, {"id": J1, "status": "queued"})])
    env = {**os.environ, "SEG_API_KEY": "k"}
    with serve(stub) as url:
        proc = subprocess.Popen(
            [sys.executable, "-m", "segsvc.cli", "submit", "-b", "1", "-j", "1", "--url", url]
            + [str(path) for path in files],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # as `head -1` does
        stub.gone.set()  # the second submit's answer comes now: its line finds no reader
        code = proc.wait(60)
        stderr = proc.stderr.read().decode()
        sent = len(stub.times)
    assert first.startswith(J1.encode()), stderr
    assert code == 141, stderr
    assert "Traceback" not in stderr
    assert "stdout closed" in stderr
    assert f"{J1}\tqueued\t{files[1]}" in stderr  # the next line, taken but not printed
    assert sent < len(files)


def test_cli_submit_lines_escape_tabs_and_newlines_in_names(tmp_path: Path) -> None:
    """A file name with a tab or a newline stays one line of three fields (`cut -f1` works):
    they, and the backslash, are written \\t, \\n and \\\\."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a\tb.png", "c\nd.png", "e\\f.png"):
        (folder / name).write_bytes(b"png")
    with serve(Scripted([(202, {}, {"id": J1, "status": "queued"})])) as url:
        result = cli("submit", str(folder), "-b", "1", url=url)
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert sorted(Path(name).name for _, _, name in rows) == [
        "a\\tb.png",
        "c\\nd.png",
        "e\\\\f.png",
    ]


@pytest.mark.parametrize("url", ["http://127.0.0.1:8o00", "http://[::1", "localhost:8000"])
@pytest.mark.parametrize(
    "command", [["status", J1], ["client", "get", J1], ["cancel", J1], ["submit"], ["models"]]
)
def test_cli_a_url_that_cannot_be_a_servers_is_a_usage_error(
    tmp_path: Path, url: str, command: list[str]
) -> None:
    """Regression: `--url http://127.0.0.1:8o00` (or `http://[::1`) ended in a traceback, and
    `localhost:8000` (no scheme) was retried as a lost connection. Now: one line, exit 2."""
    if command == ["submit"]:
        command = ["submit", str(png_files(tmp_path, 1)[0])]
    elif command == ["models"]:
        command = ["client", "models", "list"]
    started = time.monotonic()
    result = cli(*command, url=url, key="k", SEG_RETRIES="3")
    assert time.monotonic() - started < 2.5  # retried as a lost connection it took 3 s+
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {url!r} is not a server URL" + result.stderr.split("is not a server URL")[1][:-1]
    ]
    assert "SEG_URL" in result.stderr


def test_cli_an_unreachable_server_stops_the_run_and_says_it_retries_once(tmp_path: Path) -> None:
    """Regression: a wrong --url kept `submit FOLDER` retrying each chunk in turn, silently.
    Now one line says it retries, and the run stops once a request failed through its
    retries: the other files are reported as not sent, exit 3."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    png_files(tmp_path, 8)
    started = time.monotonic()
    result = cli(
        "submit",
        str(tmp_path),
        "-b",
        "1",
        "-j",
        "1",
        url=f"http://127.0.0.1:{port}",
        key="k",
        SEG_RETRIES="2",
    )
    assert time.monotonic() - started < 4
    assert result.exit_code == 3, result.output
    assert result.stderr.count("retrying") == 1
    assert "warning: cannot connect to" in result.stderr
    statuses = [line.split("\t")[1] for line in result.stdout.splitlines()]
    assert sorted(statuses) == ["error"] + ["skipped"] * 7
    said = " ".join(result.stderr.split())  # as one line: the summary wraps long lines
    assert said.count("not sent: the run stopped (the server could not be reached)") == 7


def test_cli_submit_of_a_folder_leaves_out_earlier_results(tmp_path: Path) -> None:
    """A rerun with --out inside the photos' folder does not send the results as photos."""
    photos = tmp_path / "photos"
    photos.mkdir()
    png_files(photos, 1)
    (photos / "masks").mkdir()
    for name in ("p0.mask.png", "p0.overlay.png"):
        (photos / "masks" / name).write_bytes(b"png")
    stub = Scripted([(202, {}, {"id": J1, "status": "queued"})])
    with serve(stub) as url:
        result = cli("submit", str(photos), url=url, key="k")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{J1}\tqueued\t{photos / 'p0.png'}\n"
    assert len(stub.times) == 1
    assert "note: 2 files in the folders are segsvc results" in result.stderr


def test_cli_skip_existing_sends_only_the_files_without_every_result(tmp_path: Path) -> None:
    """A resumed run (`--skip-existing`) uploads no file whose results are all in --out: p0
    has its mask and overlay, p1 only its mask (so it is sent), p2 nothing."""
    photos = tmp_path / "photos"
    photos.mkdir()
    png_files(photos, 3)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("p0.mask.png", "p0.overlay.png", "p1.mask.png"):
        (out / name).write_bytes(b"png")
    stub = Scripted([(201, {}, {"id": J1, "status": "failed"})])
    args = ("submit", str(photos), "--out", str(out), "--overlay", "-b", "1", "-j", "1")
    with serve(stub) as url:
        result = cli(*args, "--skip-existing", url=url, key="k")
        no_out = cli("submit", str(photos), "--skip-existing", url=url, key="k")
    assert len(stub.times) == 2  # p1 and p2
    lines = sorted(ln.split("\t") for ln in result.stdout.splitlines())
    assert lines == [
        ["-", "exists", str(photos / "p0.png")],
        [J1, "failed", str(photos / "p1.png")],
        [J1, "failed", str(photos / "p2.png")],
    ]
    assert result.exit_code == 1, result.output  # the two jobs sent failed
    assert "exists" in result.stderr  # the summary counts it
    assert no_out.exit_code == 2
    assert "--skip-existing needs --out" in no_out.output
    assert len(stub.times) == 2


def test_cli_an_option_the_server_refuses_for_every_file_stops_the_run(
    app: Any, api_key: str, tmp_path: Path
) -> None:
    """The real server's refusal of --webhook-events without --webhook (a field, not an
    image): one batch and one single file are sent, not one request per file."""
    posts: list[str] = []
    for photo in sample_images(8):
        shutil.copy(photo, tmp_path / photo.name)

    def counting(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["REQUEST_METHOD"] == "POST":
            posts.append(str(environ["PATH_INFO"]))
        return app(environ, start_response)

    with serve(counting) as url:
        result = cli(
            "submit",
            str(tmp_path),
            "-b",
            "4",
            "-j",
            "1",
            "--webhook-events",
            "start",
            url=url,
            key=api_key,
        )
    assert result.exit_code == 1, result.output
    assert posts == ["/v1/jobs/batch", "/v1/jobs"]
    said = " ".join(result.stderr.split())  # as one line: the summary wraps long lines
    assert "needs a 'webhook' URL" in said
    assert said.count("not sent: the run stopped (the server refuses every file alike") == 7


def test_without_seg_url_the_cli_asks_the_local_server_on_its_seg_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key came from `make run`'s settings (SEG_VAR_DIR), but the URL stayed port 8000
    whatever SEG_PORT said: a newcomer on another port got 'cannot connect' and exit 3."""
    from segsvc.settings import get_settings
    from tests.segsvc.test_client import J1, Scripted

    var = tmp_path / "var"
    var.mkdir()
    (var / "local_api_key").write_text("seg_local\n")
    stub = Scripted([(200, {}, {"id": J1, "status": "queued"})])
    keys: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        keys.append(environ.get("HTTP_AUTHORIZATION", ""))
        return stub(environ, start_response)

    with serve(app) as url:
        port = url.rsplit(":", 1)[1]
        monkeypatch.delenv("SEG_URL", raising=False)
        monkeypatch.delenv("SEG_API_KEY", raising=False)
        monkeypatch.setenv("SEG_PORT", port)
        monkeypatch.setenv("SEG_VAR_DIR", str(var))
        get_settings.cache_clear()
        try:
            result = CliRunner().invoke(main, ["status", J1, "--retries", "0"])
        finally:
            get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "queued" in result.output
    assert keys == ["Bearer seg_local"]


def test_status_shows_timings_as_people_read_them() -> None:
    from tests.segsvc.test_client import J1, Scripted

    job = {"id": J1, "status": "succeeded", "metrics": {"queue_ms": 12, "predict_ms": 224.4876}}
    with serve(Scripted([(200, {}, job)])) as url:
        result = cli("status", J1, url=url, key="k")
    assert "queue=12.0ms  predict=224.5ms" in result.output


# `segsvc ARGS` in a process of its own, Ctrl-C raising KeyboardInterrupt there even where the
# tests run with SIGINT ignored (in the background of a script: the child inherits that, and
# Python then installs no handler of its own).
CLI_WITH_CTRL_C = (
    "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from segsvc.cli import main; main()"
)


def start_cli(args: list[str], url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SEG_URL": url, "SEG_API_KEY": "k", "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-c", CLI_WITH_CTRL_C, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


@contextmanager
def never_answering() -> Iterator[tuple[str, list[socket.socket]]]:
    """A server on 127.0.0.1 that accepts every connection and never answers (a hung process,
    a proxy holding requests); yields its URL and the connections it holds."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", held
    finally:
        done.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def test_cli_get_keeps_its_timeout_while_the_server_stalls() -> None:
    """Regression: `get --timeout 2` bounded only the wait, not the first read of the job:
    against a server that never answers, six tries of 30 s each took 194 s. The first read
    and the download now end by the same deadline."""
    with never_answering() as (url, held):
        proc = start_cli(["get", J1, "--timeout", "2", "--retries", "5"], url)
        started = time.monotonic()
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("`segsvc get --timeout 2` still running after 30 s")
        took = time.monotonic() - started
    assert took < 6, f"took {took:.1f}s"  # 2 s, WAIT_MARGIN_S, and the process's start
    assert proc.returncode == 1, stderr  # a wait that timed out
    assert b"the wait ran out" in stderr
    assert len(held) == 1  # no retry past the deadline


@pytest.mark.parametrize("command", [["status", J1], ["get", J1, "--timeout", "60"]])
def test_cli_ctrl_c_during_get_or_status_exits_130(command: list[str]) -> None:
    """Regression: Ctrl-C during `get` or `status` printed click's "Aborted!" and exited 1,
    the code of a failed job; now one line and 130, as `submit`."""
    with never_answering() as (url, held):
        proc = start_cli(command, url)
        deadline = time.monotonic() + 30
        while not held and time.monotonic() < deadline:  # its request is in flight
            time.sleep(0.01)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert stderr.decode().splitlines() == ["interrupted (Ctrl-C)"]
    assert stdout == b""


def test_cli_submit_on_sigterm_reports_the_jobs_taken_and_exits_143(tmp_path: Path) -> None:
    """Regression: SIGTERM (timeout(1), a CI job canceled, `docker stop`) killed `submit` at
    once: exit 143 with nothing said of the jobs the server had taken. Now it stops as on
    Ctrl-C (each job's line, the summary, what was not waited for) and still exits 143."""
    files = png_files(tmp_path, 6)
    stub = Scripted([(202, {}, {"id": J1, "status": "queued"})], hold_s=0.2)  # never ends
    with serve(stub) as url:
        proc = start_cli(["submit", "--wait", "-b", "1", "-j", "2", *map(str, files)], url)
        deadline = time.monotonic() + 30
        while len(stub.times) < 4 and time.monotonic() < deadline:  # both waits are on
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    said = " ".join(stderr.decode().split())  # as one line: the summary wraps long lines
    assert proc.returncode == 143, said
    rows = [line.split(b"\t") for line in stdout.splitlines()]
    assert len(rows) == 2, said
    assert all(job_id == J1.encode() and status == b"queued" for job_id, status, _ in rows)
    assert said.count("not waited for: the run stopped (SIGTERM)") == 2
    assert "terminated (SIGTERM): 2 of 6 files accepted" in said
    assert "Traceback" not in said


def test_sigterm_is_handled_only_while_submit_runs() -> None:
    """The SIGTERM handler `submit` sets is the one found before once it is done."""
    from segsvc.bulk_submit import Terminated, sigterm_as_interrupt

    def terminated_inside() -> None:
        with sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) != before
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in this thread at once

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        terminated_inside()
    assert signal.getsignal(signal.SIGTERM) == before
