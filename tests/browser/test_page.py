"""The web page in real headless Chromium (Debian's package) driven by Playwright."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image, ImageOps

from segsvc.ml.imaging import render_overlay_png
from tests.conftest import ROOT, sample_images
from tests.live import serve

CHROMIUM = Path(os.environ.get("SEG_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
OUTPUT_DIR = ROOT / "test-output" / "browser"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module (skipped only when Chromium is truly absent)."""
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium not installed at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser: Any, app: Any) -> Iterator[tuple[Any, str]]:
    """A fresh page (own localStorage) on a live server of the test app."""
    with serve(app) as url:
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        tab = context.new_page()
        tab.goto(url)
        tab.wait_for_selector("body[data-ready='true']")
        yield tab, url
        context.close()


def png_bytes(mode: str, colour: Any) -> bytes:
    """A 4 x 3 PNG of one colour (a fake overlay or mask)."""
    buffer = io.BytesIO()
    Image.new(mode, (4, 3), colour).save(buffer, "PNG")
    return buffer.getvalue()


# (status, JSON body, raw text or PNG bytes), or "abort": a network error
Answer = tuple[int, Any] | str


class FakeJobs:
    """The job endpoints answered in the page's browser from a script (no worker needed). The
    n-th upload makes job `job-n`; each job's polls get the next of `polls` (the last one
    repeats), its images the next of `images[path]` (then a PNG), a cancel `cancel_status`.
    A request named in `hold` ("METHOD path") gets no answer the first time: it waits in
    `held` until the test answers it."""

    def __init__(
        self,
        tab: Any,
        polls: list[Answer],
        *,
        images: dict[str, list[Answer]] | None = None,
        hold: set[str] | None = None,
    ) -> None:
        self.polls, self.images, self.hold = polls, images or {}, hold or set()
        self.seen: list[str] = []  # "METHOD path" of every request, in order
        self.held: dict[str, Any] = {}
        self.uploads = 0
        self.cancel_status = "canceled"  # what a cancel answers (a running job: "running")
        self.ids = "job-{}"  # the n-th upload's job id
        tab.route(re.compile(r"/v1/jobs"), self.answer)

    @staticmethod
    def job(status: str) -> dict[str, Any]:
        """A job's JSON (its id is added as it is sent)."""
        return {"status": status, "metrics": {}}

    def answer(self, route: Any) -> None:
        request = route.request
        path = urlsplit(request.url).path
        seen = f"{request.method} {path}"
        self.seen.append(seen)
        if seen in self.hold:
            self.hold.discard(seen)
            self.held[seen] = route
            return None
        if seen == "POST /v1/jobs":
            self.uploads += 1
            job_id = self.ids.format(self.uploads)
            return self.send(route, (202, {"id": job_id, **self.job("queued")}))
        job_id = path.split("/")[3]
        if path.endswith("/cancel"):
            return self.send(route, (200, {"id": job_id, **self.job(self.cancel_status)}))
        if path.endswith(".png"):
            if self.images.get(path):
                return self.send(route, self.images[path].pop(0))
            image = png_bytes("RGB", (200, 0, 0)) if "overlay" in path else png_bytes("L", 0)
            return route.fulfill(status=200, body=image, content_type="image/png")
        answer = self.polls[min(self.seen.count(seen), len(self.polls)) - 1]
        if not isinstance(answer, str) and isinstance(answer[1], dict):
            answer = (answer[0], {"id": job_id, **answer[1]})
        return self.send(route, answer)

    @staticmethod
    def send(route: Any, answer: Answer) -> None:
        if answer == "abort":
            return route.abort("connectionreset")
        status, body = answer
        if isinstance(body, bytes):
            return route.fulfill(status=status, body=body, content_type="image/png")
        if isinstance(body, str):
            return route.fulfill(status=status, body=body, content_type="text/html")
        return route.fulfill(status=status, json=body)


def save_key(tab: Any, key: str) -> None:
    tab.fill("#api-key", key)
    tab.click("#key-save")


def screenshot(tab: Any, tmp_path: Path, name: str) -> Path:
    """Save a full-page screenshot in the test's tmp dir and under test-output/."""
    path = tmp_path / name
    tab.screenshot(path=str(path), full_page=True)
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, OUTPUT_DIR / name)
    return path


@pytest.mark.e2e
def test_page_uploads_photo_and_shows_overlay_and_mask(
    page: tuple[Any, str], api_key: str, worker: Path, tmp_path: Path
) -> None:
    tab, _ = page
    asked: list[str] = []
    tab.on("request", lambda request: asked.append(urlsplit(request.url).path))
    save_key(tab, api_key)
    assert "Key saved" in tab.inner_text("#key-state")
    photo = sample_images(1)[0]
    with Image.open(photo) as src:
        width, height = ImageOps.exif_transpose(src).size
    tab.set_input_files("#file-input", str(photo))
    tab.wait_for_function(
        "() => !document.getElementById('results').hidden"
        " && document.getElementById('overlay-img').complete"
        " && document.getElementById('overlay-img').naturalWidth > 0",
        timeout=120_000,
    )
    natural = tab.eval_on_selector("#overlay-img", "i => [i.naturalWidth, i.naturalHeight]")
    assert natural == [width, height], worker.read_text()[-2000:]
    canvas = tab.eval_on_selector("#mask-canvas", "c => [c.width, c.height]")
    assert canvas == [width, height]
    assert tab.is_visible("#overlay-img")
    assert tab.inner_text("#status-text") == "Done."
    assert tab.get_attribute("#download-mask", "href").startswith("blob:")
    assert tab.get_attribute("#download-overlay", "href") == "#"  # fetched when clicked
    assert tab.is_hidden("#error-box")
    shot = screenshot(tab, tmp_path, "page-result.png")
    with Image.open(shot) as img:
        assert img.width >= 1200

    tab.check("#show-original")
    assert tab.inner_text("#left-caption") == "Original photo"
    # drawn here from the photo and the mask: the server's overlay is fetched only to download
    assert not [path for path in asked if path.endswith("/overlay.png")], asked
    job_url = tab.url
    assert re.search(r"#job=[0-9a-f-]{36}$", job_url), job_url

    tab.reload()
    tab.wait_for_selector("body[data-ready='true']")
    assert "Key saved" in tab.inner_text("#key-state")  # the key survives a reload
    assert tab.url == job_url
    # and so does the job: without the photo in the page, the server's overlay is shown
    tab.wait_for_function(RESULTS_SHOWN, timeout=30_000)
    natural = tab.eval_on_selector("#overlay-img", "i => [i.naturalWidth, i.naturalHeight]")
    assert natural == [width, height]
    assert [path for path in asked if path.endswith("/overlay.png")]
    assert tab.is_disabled("#show-original")  # no photo to show
    assert tab.inner_text("#status-text") == "Done."
    assert tab.is_hidden("#error-box")


@pytest.mark.e2e
def test_page_waits_out_a_busy_server_for_the_overlay_download(
    page: tuple[Any, str], api_key: str, worker: Path, settings: Any
) -> None:
    """A result over 4 MP is drawn one at a time per API process: the page waits as the 503's
    Retry-After says instead of giving up (it offered no way to try again). The overlay is
    fetched only when its link is clicked, and saved as the server drew it."""
    tab, _ = page
    busy: list[str] = []

    def first_busy(route: Any) -> None:
        if not busy:
            busy.append(route.request.url)
            route.fulfill(
                status=503,
                headers={"Retry-After": "1", "Content-Type": "application/json"},
                body='{"error": "large_decodes_busy", "message": "busy"}',
            )
        else:
            route.continue_()

    tab.route("**/overlay.png", first_busy)
    save_key(tab, api_key)
    photo = sample_images(1)[0]
    tab.set_input_files("#file-input", str(photo))
    tab.wait_for_function(RESULTS_SHOWN, timeout=120_000)
    assert busy == [], worker.read_text()[-2000:]
    with tab.expect_download(timeout=30_000) as download:
        tab.click("#download-overlay")
    assert len(busy) == 1
    job_id = tab.url.split("#job=")[1]
    assert download.value.suggested_filename == f"{job_id}-overlay.png"
    with Image.open(download.value.path()) as saved:
        assert saved.size == ImageOps.exif_transpose(Image.open(photo)).size
        assert saved.format == "PNG"
    assert tab.is_hidden("#error-box")


def test_page_explains_bad_file_and_bad_key(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    tab, _ = page
    junk = tmp_path / "holiday.jpg"
    junk.write_bytes(b"this is not a photo at all")
    save_key(tab, api_key)
    tab.set_input_files("#file-input", str(junk))
    tab.wait_for_selector("#error-box:not([hidden])")
    assert "image" in tab.inner_text("#error-box").lower()

    save_key(tab, "seg_not_a_real_key")
    tab.set_input_files("#file-input", str(sample_images(1)[0]))
    tab.wait_for_selector("#error-box:not([hidden])")
    tab.wait_for_function("() => document.getElementById('error-box').textContent.includes('key')")
    assert "API key was not accepted" in tab.inner_text("#error-box")
    assert tab.is_hidden("#progress-box")
    screenshot(tab, tmp_path, "page-error.png")


def test_page_refuses_oversized_file_before_upload(
    page: tuple[Any, str], api_key: str, tmp_path: Path, settings: Any
) -> None:
    tab, _ = page
    save_key(tab, api_key)
    big = tmp_path / "huge.png"
    big.write_bytes(b"\0" * (settings.max_upload_bytes + 1))
    tab.set_input_files("#file-input", str(big))
    tab.wait_for_selector("#error-box:not([hidden])")
    assert "too large" in tab.inner_text("#error-box")
    assert tab.is_hidden("#progress-box")


RESULTS_SHOWN = (
    "() => !document.getElementById('results').hidden"
    " && document.getElementById('overlay-img').naturalWidth > 0"
)


def test_page_keeps_polling_through_a_proxy_restart(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    """A rolling restart behind a proxy: 502, 504, a cut connection and the proxy's own HTML
    page (a 200) while the job runs; the page keeps asking and shows the result (any of them
    used to stop the polling for good, or throw and freeze the page)."""
    tab, _ = page
    bad_gateway = (502, "<html>Bad Gateway</html>")
    polls: list[Answer] = [
        bad_gateway,
        (504, "<html>Gateway Timeout</html>"),
        "abort",
        (200, "<html>Welcome to nginx</html>"),
        (200, FakeJobs.job("succeeded")),
    ]
    # the results are retried too
    jobs = FakeJobs(tab, polls, images={"/v1/jobs/job-1/mask.png": [bad_gateway, "abort"]})
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    save_key(tab, api_key)
    photo = tmp_path / "cat.png"
    photo.write_bytes(png_bytes("RGB", (0, 128, 0)))
    tab.set_input_files("#file-input", str(photo))
    tab.wait_for_function(RESULTS_SHOWN, timeout=45_000)
    assert jobs.seen.count("GET /v1/jobs/job-1") == 5
    assert tab.is_hidden("#error-box")
    assert tab.inner_text("#status-text") == "Done."
    assert errors == []


def test_page_a_second_photo_stops_the_first_upload(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    """A second photo chosen while the first still uploads: the first upload is stopped, so it
    makes no job that the page would never show (it went on, and its job was stored unseen)."""
    tab, _ = page
    jobs = FakeJobs(tab, [(200, FakeJobs.job("succeeded"))], hold={"POST /v1/jobs"})
    failed: list[str] = []
    tab.on("requestfailed", lambda request: failed.append(f"{request.method} {request.url}"))
    save_key(tab, api_key)
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    for photo in (first, second):
        photo.write_bytes(png_bytes("RGB", (0, 128, 0)))
    tab.set_input_files("#file-input", str(first))
    tab.wait_for_function("() => document.getElementById('status-text').textContent !== ''")
    wait_for_request(tab, jobs, "POST /v1/jobs")  # the first upload reached the silent server
    assert list(jobs.held) == ["POST /v1/jobs"]
    tab.set_input_files("#file-input", str(second))
    tab.wait_for_function(RESULTS_SHOWN, timeout=30_000)
    assert jobs.uploads == 1  # the second; the first was never answered
    assert any(seen.startswith("POST ") and seen.endswith("/v1/jobs") for seen in failed), failed


def upload(tab: Any, tmp_path: Path, name: str) -> None:
    photo = tmp_path / name
    photo.write_bytes(png_bytes("RGB", (0, 128, 0)))
    tab.set_input_files("#file-input", str(photo))


def drop_files(tab: Any, files: list[str]) -> None:
    """Drag `files` onto the drop zone and drop them, as a person does (Chromium's own drag
    events, through the DevTools protocol)."""
    cdp = tab.context.new_cdp_session(tab)
    box = tab.locator("#drop-zone").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    data = {"items": [], "files": files, "dragOperationsMask": 1}
    for kind in ("dragEnter", "dragOver", "drop"):
        cdp.send("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": data})


def wait_for_request(tab: Any, jobs: FakeJobs, seen: str) -> None:
    for _ in range(100):
        if seen in jobs.seen:
            return
        tab.wait_for_timeout(100)
    raise AssertionError(f"no {seen}: {jobs.seen}")


def test_page_a_new_photo_shows_nothing_of_the_one_before(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    """A second photo after the first's result was shown as the original photo, while the
    first's images or cancel still were on their way: the page shows only the second job (the
    caption still said "Original photo" over the overlay; the first's late image error or
    cancel answer was shown as the second's)."""
    tab, _ = page
    done = (200, FakeJobs.job("succeeded"))
    jobs = FakeJobs(tab, [done])
    save_key(tab, api_key)
    upload(tab, tmp_path, "first.png")
    tab.wait_for_function(RESULTS_SHOWN)
    tab.check("#show-original")
    assert tab.inner_text("#left-caption") == "Original photo"
    upload(tab, tmp_path, "second.png")
    tab.wait_for_function(
        "() => document.getElementById('job-details').textContent.includes('job-2')"
    )
    assert tab.inner_text("#left-caption") == "Overlay"

    # the third job's images are late; the fourth's photo comes meanwhile
    jobs.hold = {"GET /v1/jobs/job-3/mask.png"}
    upload(tab, tmp_path, "third.png")
    wait_for_request(tab, jobs, "GET /v1/jobs/job-3/mask.png")
    upload(tab, tmp_path, "fourth.png")
    tab.wait_for_function(
        "() => document.getElementById('job-details').textContent.includes('job-4')"
    )
    gone = (404, {"error": "not_found", "message": "No such job."})
    jobs.send(jobs.held.pop("GET /v1/jobs/job-3/mask.png"), gone)
    tab.wait_for_timeout(500)
    assert tab.is_hidden("#error-box")

    # the fifth job's cancel is answered after the sixth's photo came (and before its poll)
    jobs.polls = [(200, FakeJobs.job("running"))]
    jobs.hold = {"POST /v1/jobs/job-5/cancel", "GET /v1/jobs/job-6"}
    upload(tab, tmp_path, "fifth.png")
    tab.wait_for_selector("#cancel-button:not([hidden])")
    tab.click("#cancel-button")
    wait_for_request(tab, jobs, "POST /v1/jobs/job-5/cancel")
    upload(tab, tmp_path, "sixth.png")
    wait_for_request(tab, jobs, "GET /v1/jobs/job-6")
    canceled = (200, {"id": "job-5", "status": "canceled"})
    jobs.send(jobs.held.pop("POST /v1/jobs/job-5/cancel"), canceled)
    tab.wait_for_timeout(500)
    assert tab.inner_text("#status-text") == "Waiting in the queue for a worker."
    assert tab.is_hidden("#error-box")
    tab.click("#cancel-button")  # cancels the sixth job, not the fifth again
    wait_for_request(tab, jobs, "POST /v1/jobs/job-6/cancel")


def done_step_classes(tab: Any) -> list[str]:
    return sorted(tab.eval_on_selector("#steps li[data-step='done']", "li => [...li.classList]"))


def test_page_shows_a_cancel_that_waits_and_a_job_that_ended_badly(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    """A running job stops at the worker's next batch boundary, so its cancel answers "running":
    the page says the cancel was asked for (it showed no change). A canceled or failed job's
    Done step is marked as such (it got the green tick of a success, beside the red error)."""
    tab, _ = page
    jobs = FakeJobs(tab, [(200, FakeJobs.job("running"))])
    jobs.cancel_status = "running"
    save_key(tab, api_key)
    upload(tab, tmp_path, "cat.png")
    tab.wait_for_function(
        "() => document.getElementById('status-text').textContent.startsWith('A worker')"
    )
    tab.click("#cancel-button")
    tab.wait_for_function(
        "() => document.getElementById('status-text').textContent.startsWith('Cancel requested')"
    )
    assert tab.is_hidden("#cancel-button")  # asked once
    jobs.polls = [(200, {**FakeJobs.job("canceled"), "error": {"message": "Canceled."}})]
    tab.wait_for_function(
        "() => document.getElementById('status-text').textContent === 'The job was canceled.'"
    )
    assert done_step_classes(tab) == ["ended"]

    failed = {**FakeJobs.job("failed"), "error": {"code": "x", "message": "out of memory"}}
    jobs.polls = [(200, failed)]
    upload(tab, tmp_path, "dog.png")
    tab.wait_for_selector("#error-box:not([hidden])")
    assert "out of memory" in tab.inner_text("#error-box")
    assert tab.inner_text("#status-text") == "The job failed."
    assert done_step_classes(tab) == ["ended"]


def test_page_shows_the_mask_when_the_overlay_cannot_be_drawn(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    """An overlay answered 410 (its input purged after retention) hid the mask that loaded,
    and every download, behind one error. The page draws its own overlay from the photo it
    holds; only the download, or a page reloaded without the photo, asks the server's."""
    tab, _ = page
    gone = (410, {"error": "gone", "message": "The input image of job job-1 is no longer stored."})
    jobs = FakeJobs(
        tab,
        [(200, FakeJobs.job("succeeded"))],
        images={"/v1/jobs/job-1/overlay.png": [gone, gone]},
    )
    save_key(tab, api_key)
    upload(tab, tmp_path, "cat.png")
    tab.wait_for_function(RESULTS_SHOWN, timeout=30_000)
    assert tab.inner_text("#left-caption") == "Overlay"
    assert tab.is_hidden("#error-box")
    tab.click("#download-overlay")
    tab.wait_for_selector("#error-box:not([hidden])")
    assert "no longer stored" in tab.inner_text("#error-box")
    assert tab.get_attribute("#download-overlay", "href") == "#"  # nothing to save

    tab.reload()  # the photo is gone from the page: the mask alone
    tab.wait_for_function("() => !document.getElementById('results').hidden", timeout=30_000)
    assert jobs.seen.count("GET /v1/jobs/job-1/overlay.png") == 2
    assert tab.evaluate("() => document.getElementById('mask-canvas').width") == 4
    assert "no longer stored" in tab.inner_text("#error-box")
    assert tab.is_hidden("#left-figure")
    assert tab.is_hidden("#download-overlay")
    assert tab.get_attribute("#download-mask", "href").startswith("blob:")


def test_page_refuses_a_key_no_header_can_carry(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    """A key pasted with a zero-width space was saved; each upload then threw in
    setRequestHeader and the page hung at "Uploading... 0%", with no request sent."""
    tab, _ = page
    jobs = FakeJobs(tab, [(200, FakeJobs.job("queued"))])
    save_key(tab, api_key + "\u200b")
    assert "cannot have" in tab.inner_text("#error-box")
    assert tab.evaluate("() => localStorage.length") == 0
    save_key(tab, api_key)
    assert tab.is_hidden("#error-box")
    upload(tab, tmp_path, "cat.png")
    wait_for_request(tab, jobs, "POST /v1/jobs")


def test_page_ends_a_failed_jobs_message_with_one_full_stop(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    tab, _ = page
    failed = {"error": {"code": "x", "message": "The stored model input is malformed."}}
    FakeJobs(tab, [(200, {**FakeJobs.job("failed"), **failed})])
    save_key(tab, api_key)
    upload(tab, tmp_path, "dog.png")
    tab.wait_for_selector("#error-box:not([hidden])")
    assert tab.inner_text("#error-box") == "The job failed: The stored model input is malformed."


def test_page_says_when_it_lost_contact_and_when_it_has_it_again(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    """Polls that could not reach the service were retried in silence: a stopped server looked
    like a long queue ("Waiting in the queue for a worker.") for as long as one waited."""
    tab, _ = page
    jobs = FakeJobs(tab, ["abort"])  # every poll: the connection refused or cut
    save_key(tab, api_key)
    upload(tab, tmp_path, "cat.png")
    tab.wait_for_selector("#error-box:not([hidden])", timeout=15_000)
    assert "Lost contact with the service; still trying" in tab.inner_text("#error-box")
    jobs.polls = [(200, FakeJobs.job("succeeded"))]
    tab.wait_for_function(RESULTS_SHOWN, timeout=30_000)
    assert tab.is_hidden("#error-box")


def test_page_a_cancel_that_lost_the_race_shows_the_result_and_no_error(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    """The job ended while the cancel was on its way (the page polls every 2 s): its 409 was
    shown as an error beside the finished result."""
    tab, _ = page
    jobs = FakeJobs(tab, [(200, FakeJobs.job("running"))], hold={"POST /v1/jobs/job-1/cancel"})
    save_key(tab, api_key)
    upload(tab, tmp_path, "cat.png")
    tab.wait_for_selector("#cancel-button:not([hidden])")
    tab.click("#cancel-button")
    wait_for_request(tab, jobs, "POST /v1/jobs/job-1/cancel")
    assert tab.is_disabled("#cancel-button")  # one cancel at a time
    conflict = (409, {"error": "conflict", "message": "Job job-1 is already succeeded."})
    jobs.polls = [(200, FakeJobs.job("succeeded"))]
    jobs.send(jobs.held.pop("POST /v1/jobs/job-1/cancel"), conflict)
    tab.wait_for_function(RESULTS_SHOWN, timeout=30_000)
    tab.wait_for_timeout(300)
    assert tab.is_hidden("#error-box"), tab.inner_text("#error-box")
    assert tab.is_hidden("#cancel-button")


def test_page_says_which_of_several_dropped_photos_it_sent(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    """Dropping three photos sent the first and said nothing of the others; a first file that
    was not an image refused the whole drop."""
    tab, _ = page
    jobs = FakeJobs(tab, [(200, FakeJobs.job("succeeded"))])
    save_key(tab, api_key)
    (tmp_path / "notes.txt").write_text("not a photo")
    files = [str(tmp_path / "notes.txt")]
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(png_bytes("RGB", (0, 128, 0)))
        files.append(str(tmp_path / name))
    drop_files(tab, files)
    tab.wait_for_function(RESULTS_SHOWN, timeout=30_000)
    assert jobs.uploads == 1
    # information, not an error: no alert, and gone at the next upload (it stayed after success)
    assert tab.inner_text("#notice-box") == (
        "One photo at a time: sending a.png; the other 2 were not sent."
    )
    assert tab.get_attribute("#notice-box", "role") == "status"
    assert tab.is_hidden("#error-box")
    upload(tab, tmp_path, "c.png")
    tab.wait_for_function("() => document.getElementById('notice-box').hidden")


def test_page_a_key_saved_again_resumes_the_polls_it_stopped(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    """A poll refused for the key stopped polling for good, the Running step still lit; and
    saving the key again cleared the error but left the page saying a worker was busy."""
    tab, _ = page
    unauthorized = (401, {"error": "unauthorized", "message": "Missing API key."})
    jobs = FakeJobs(tab, [(200, FakeJobs.job("running"))])
    save_key(tab, api_key)
    upload(tab, tmp_path, "cat.png")
    tab.wait_for_function(
        "() => document.getElementById('status-text').textContent.startsWith('A worker')"
    )
    jobs.polls = [unauthorized]
    tab.wait_for_selector("#error-box:not([hidden])", timeout=10_000)
    assert tab.inner_text("#status-text") == "Stopped checking on the job."
    assert tab.locator("#steps li.active").count() == 0
    jobs.polls = [(200, FakeJobs.job("succeeded"))]
    save_key(tab, api_key)
    tab.wait_for_function(RESULTS_SHOWN, timeout=30_000)


def test_page_names_its_controls_for_screen_readers(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    tab, _ = page
    FakeJobs(tab, [(200, FakeJobs.job("succeeded"))])
    save_key(tab, api_key)
    upload(tab, tmp_path, "cat.png")
    tab.wait_for_function(RESULTS_SHOWN)
    cdp = tab.context.new_cdp_session(tab)
    nodes = cdp.send("Accessibility.getFullAXTree")["nodes"]
    named = {
        (n.get("role", {}).get("value"), n.get("name", {}).get("value"))
        for n in nodes
        if not n.get("ignored")
    }
    assert ("button", "Drop a photo here, or choose a file") in named
    assert ("progressbar", "Upload progress") in named
    # a canvas without a role is a "Canvas", no image (Chromium says "image" for role="img")
    mask = {role for role, name in named if name == "The segmentation mask, coloured"}
    assert mask & {"img", "image"}, mask
    blended = "The photo with the segmentation blended on it"
    assert tab.get_attribute("#overlay-img", "alt") == blended
    tab.check("#show-original")
    assert tab.get_attribute("#overlay-img", "alt") == "The original photo"


def test_page_saving_the_key_while_polling_keeps_the_polls_apart(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    """Polling restarted by a saved key began at a delay of 0, and 0 x 1.5 stays 0: the page
    asked as fast as the server answered (339 polls in 3 s)."""
    tab, _ = page
    jobs = FakeJobs(tab, [(200, FakeJobs.job("queued"))])
    save_key(tab, api_key)
    upload(tab, tmp_path, "cat.png")
    tab.wait_for_function(
        "() => document.getElementById('status-text').textContent.startsWith('Waiting')"
    )
    save_key(tab, api_key)
    before = jobs.seen.count("GET /v1/jobs/job-1")
    tab.wait_for_timeout(3_000)
    assert jobs.seen.count("GET /v1/jobs/job-1") - before <= 8


def test_page_a_refused_drop_says_why_not_that_it_was_sent(
    page: tuple[Any, str], tmp_path: Path
) -> None:
    tab, _ = page
    jobs = FakeJobs(tab, [(200, FakeJobs.job("succeeded"))])
    files = []
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(png_bytes("RGB", (0, 128, 0)))
        files.append(str(tmp_path / name))
    drop_files(tab, files)
    tab.wait_for_selector("#error-box:not([hidden])")
    assert jobs.uploads == 0
    assert tab.inner_text("#error-box") == "Paste your API key above first."


def page_png(tab: Any, selector: str, attribute: str) -> Image.Image:
    """The image a blob: URL on the page shows (an <img>'s src, a link's href), as the page
    decodes it (drawn on a canvas: the page's CSP lets no script fetch a blob: URL)."""
    data_url = tab.eval_on_selector(
        selector,
        """async (e, attribute) => {
            const img = new Image();
            img.src = e.getAttribute(attribute);
            await img.decode();
            const canvas = document.createElement("canvas");
            canvas.width = img.naturalWidth;
            canvas.height = img.naturalHeight;
            canvas.getContext("2d").drawImage(img, 0, 0);
            return canvas.toDataURL("image/png");
        }""",
        attribute,
    )
    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    image.load()
    return image


def rgb(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = image.convert("RGB").getpixel(xy)
    assert isinstance(value, tuple)
    return value


def assert_near(got: tuple[int, ...], want: tuple[int, ...], where: object) -> None:
    """Within 2 per channel: the browser blends in premultiplied 8-bit steps, Pillow not."""
    assert all(abs(a - b) <= 2 for a, b in zip(got, want, strict=True)), (where, got, want)


def test_page_draws_the_overlay_itself_and_fetches_overlay_png_only_to_download(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    """The page said "Done." and then showed nothing while it downloaded overlay.png, as large
    as the photo (28 MB for a 24 MP photo: 17 s on a phone's 20 Mbit/s). It draws the overlay
    from the photo it holds and the mask, as the server does, says it is loading meanwhile, and
    fetches overlay.png when its link is clicked."""
    tab, _ = page
    photo = Image.new("RGB", (4, 3), (0, 128, 0))
    photo.putpixel((3, 2), (10, 20, 30))
    mask = Image.new("L", (4, 3), 1)  # background, one pet pixel, one border pixel
    mask.putpixel((0, 0), 0)
    mask.putpixel((1, 0), 2)
    photo_png, mask_png = io.BytesIO(), io.BytesIO()
    photo.save(photo_png, "PNG")
    mask.save(mask_png, "PNG")
    server_overlay = render_overlay_png(photo_png.getvalue(), mask_png.getvalue())
    jobs = FakeJobs(
        tab,
        [(200, FakeJobs.job("succeeded"))],
        images={
            "/v1/jobs/job-1/mask.png": [(200, mask_png.getvalue())],
            "/v1/jobs/job-1/overlay.png": [(200, server_overlay)],
        },
        hold={"GET /v1/jobs/job-1/mask.png"},
    )
    save_key(tab, api_key)
    (tmp_path / "cat.png").write_bytes(photo_png.getvalue())
    tab.set_input_files("#file-input", str(tmp_path / "cat.png"))
    wait_for_request(tab, jobs, "GET /v1/jobs/job-1/mask.png")
    tab.wait_for_function(
        "() => document.getElementById('status-text').textContent === 'Loading the result\u2026'"
    )
    assert tab.is_hidden("#results")
    jobs.send(jobs.held.pop("GET /v1/jobs/job-1/mask.png"), (200, mask_png.getvalue()))
    tab.wait_for_function(RESULTS_SHOWN)
    assert tab.inner_text("#status-text") == "Done."
    assert "GET /v1/jobs/job-1/overlay.png" not in jobs.seen

    drawn = page_png(tab, "#overlay-img", "src").convert("RGB")
    with Image.open(io.BytesIO(server_overlay)) as expected:
        for xy in ((0, 0), (1, 0), (2, 1), (3, 2)):  # pet, border, background, background
            assert_near(rgb(drawn, xy), rgb(expected, xy), xy)
    with tab.expect_download() as saved:  # a PNG any reader takes (its chunks' CRCs hold)
        tab.click("#download-mask-colour")
    assert saved.value.suggested_filename == "job-1-mask-colour.png"
    colours = Image.open(saved.value.path())
    colours.load()
    assert colours.size == (4, 3)
    assert [rgb(colours, xy) for xy in ((0, 0), (1, 0), (2, 1))] == [
        (255, 64, 64),
        (255, 220, 0),
        (40, 44, 60),
    ]

    with tab.expect_download() as download:
        tab.click("#download-overlay")
    assert download.value.suggested_filename == "job-1-overlay.png"
    assert Path(download.value.path()).read_bytes() == server_overlay
    with tab.expect_download() as again:  # fetched once
        tab.click("#download-overlay")
    assert Path(again.value.path()).read_bytes() == server_overlay
    assert jobs.seen.count("GET /v1/jobs/job-1/overlay.png") == 1


def test_page_draws_a_mask_that_is_not_8_bit_greyscale(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    """A mask the page cannot recolour through its palette (re-encoded as RGB on the way, say)
    is coloured pixel by pixel instead."""
    tab, _ = page
    mask = Image.new("RGB", (4, 3), (1, 1, 1))
    mask.putpixel((0, 0), (0, 0, 0))
    mask.putpixel((1, 0), (2, 2, 2))
    mask_png = io.BytesIO()
    mask.save(mask_png, "PNG")
    FakeJobs(
        tab,
        [(200, FakeJobs.job("succeeded"))],
        images={"/v1/jobs/job-1/mask.png": [(200, mask_png.getvalue())]},
    )
    save_key(tab, api_key)
    upload(tab, tmp_path, "cat.png")  # green
    tab.wait_for_function(RESULTS_SHOWN)
    drawn = page_png(tab, "#overlay-img", "src")
    assert_near(rgb(drawn, (0, 0)), (128, 96, 32), "pet")
    assert_near(rgb(drawn, (1, 0)), (153, 183, 0), "border")
    assert rgb(drawn, (2, 1)) == (0, 128, 0)
    colours = page_png(tab, "#download-mask-colour", "href")
    assert [rgb(colours, xy) for xy in ((0, 0), (1, 0), (2, 1))] == [
        (255, 64, 64),
        (255, 220, 0),
        (40, 44, 60),
    ]
    assert tab.is_hidden("#error-box")


def test_page_draws_a_large_photo_at_display_size(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    """A large photo's overlay and mask were drawn at full size (a 24 MP photo: some 200 MB of
    canvas and pixel copies) to be shown 500 pixels wide; the mask-colour.png download stays
    at the photo's size."""
    tab, _ = page
    size = (3000, 2000)
    photo = Image.new("RGB", size, (0, 0, 255))
    mask = Image.new("L", size, 0)  # left half pet, right half border
    mask.paste(2, (1500, 0, 3000, 2000))
    photo_png, mask_png = io.BytesIO(), io.BytesIO()
    photo.save(photo_png, "PNG")
    mask.save(mask_png, "PNG")
    FakeJobs(
        tab,
        [(200, FakeJobs.job("succeeded"))],
        images={"/v1/jobs/job-1/mask.png": [(200, mask_png.getvalue())]},
    )
    save_key(tab, api_key)
    (tmp_path / "big.png").write_bytes(photo_png.getvalue())
    tab.set_input_files("#file-input", str(tmp_path / "big.png"))
    tab.wait_for_function(RESULTS_SHOWN, timeout=30_000)
    canvas = tab.eval_on_selector("#mask-canvas", "c => [c.width, c.height]")
    assert canvas == [1100, 733]  # the page's width (device pixel ratio 1)
    drawn = page_png(tab, "#overlay-img", "src").convert("RGB")
    assert drawn.size == (1100, 733)
    server = Image.open(io.BytesIO(render_overlay_png(photo_png.getvalue(), mask_png.getvalue())))
    for x in (100, 1000):  # well inside each half
        assert_near(rgb(drawn, (x, 300)), rgb(server, (x * 3000 // 1100, 800)), x)
    colours = page_png(tab, "#download-mask-colour", "href")
    assert colours.size == size


def turned(photo: Path, fmt: str, orientation: int) -> bytes:
    """`photo` saved as `fmt` with an EXIF orientation tag (a PNG's eXIf chunk)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    with Image.open(photo) as img:
        img.convert("RGB").save(buffer, fmt, exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


@pytest.mark.e2e
def test_page_draws_the_overlay_of_a_turned_photo_as_the_server_does(
    page: tuple[Any, str], api_key: str, worker: Path, tmp_path: Path
) -> None:
    """The overlay the page draws (the photo as the browser turns it by its EXIF orientation,
    the mask at the size the server turned it to) is the server's overlay.png: for a JPEG
    turned a quarter, a PNG's eXIf half turn, and a WebP whose tag browsers and server ignore."""
    tab, url = page
    asked: list[str] = []
    tab.on("request", lambda request: asked.append(urlsplit(request.url).path))
    save_key(tab, api_key)
    photo = sample_images(1)[0]
    for name, fmt, orientation in (
        ("turned.jpg", "JPEG", 6),
        ("flipped.png", "PNG", 3),
        ("turned.webp", "WEBP", 6),
    ):
        (tmp_path / name).write_bytes(turned(photo, fmt, orientation))
        tab.evaluate("() => { document.getElementById('results').hidden = true; }")
        tab.set_input_files("#file-input", str(tmp_path / name))
        tab.wait_for_function(RESULTS_SHOWN, timeout=120_000)
        assert not [p for p in asked if p.endswith("/overlay.png")], asked
        job_id = tab.url.split("#job=")[1]
        request = urllib.request.Request(
            f"{url}/v1/jobs/{job_id}/overlay.png", headers={"Authorization": f"Bearer {api_key}"}
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            server = np.asarray(Image.open(io.BytesIO(resp.read())).convert("RGB"), np.int16)
        drawn = np.asarray(page_png(tab, "#overlay-img", "src").convert("RGB"), np.int16)
        assert drawn.shape == server.shape, name
        difference = np.abs(drawn - server)
        assert difference.mean() < 1.5, (name, difference.mean(), worker.read_text()[-2000:])
        assert np.percentile(difference, 99) <= 6, name


def test_page_works_where_the_browser_blocks_storage(
    browser: Any, page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    """With site data blocked (Chrome's "block all cookies") every localStorage access throws:
    the page never started, "Save key" did nothing, a chosen photo failed in silence. The key
    is kept for the page's life instead, and the page says so."""
    _, url = page
    profile = tmp_path / "profile"
    (profile / "Default").mkdir(parents=True)
    blocked = {"profile": {"default_content_setting_values": {"cookies": 2}}}
    (profile / "Default" / "Preferences").write_text(json.dumps(blocked))
    context = browser.browser_type.launch_persistent_context(
        str(profile), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
    )
    try:
        tab = context.pages[0] if context.pages else context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        jobs = FakeJobs(tab, [(200, FakeJobs.job("running"))])
        tab.goto(url)
        tab.wait_for_selector("body[data-ready='true']", timeout=10_000)
        assert tab.evaluate("() => { try { localStorage; return false; } catch { return true; } }")
        note = "This browser blocks storage; the key is kept until you close the page."
        assert tab.inner_text("#storage-note") == note
        save_key(tab, api_key)
        assert tab.inner_text("#key-state").startswith("Key kept in this page")
        upload(tab, tmp_path, "cat.png")
        wait_for_request(tab, jobs, "GET /v1/jobs/job-1")

        tab.reload()  # the key is gone with the page; the job is not
        tab.wait_for_selector("body[data-ready='true']")
        assert "No key saved yet" in tab.inner_text("#key-state")
        assert tab.inner_text("#status-text") == ("Paste your API key above to check on job job-1.")
        polls = jobs.seen.count("GET /v1/jobs/job-1")
        jobs.polls = [(200, FakeJobs.job("succeeded"))]
        save_key(tab, api_key)
        tab.wait_for_function(RESULTS_SHOWN, timeout=30_000)
        assert jobs.seen.count("GET /v1/jobs/job-1") > polls
        assert errors == []
    finally:
        context.close()


def test_page_job_details_fit_a_phone(page: tuple[Any, str], api_key: str, tmp_path: Path) -> None:
    """On a 360 px phone the job id (monospace, never wrapped) pushed the details out of the
    card and the page scrolled sideways (366 px wide)."""
    tab, _ = page
    tab.set_viewport_size({"width": 360, "height": 740})
    details = {
        "model_version": "baseline-ab863847",
        "input": {"width": 500, "height": 334},
        "metrics": {"queue_ms": 38, "predict_ms": 24, "batch_size": 1},
        "result": {"class_fractions": [0.277, 0.607, 0.115]},
    }
    jobs = FakeJobs(tab, [(200, {**FakeJobs.job("succeeded"), **details})])
    jobs.ids = "bca1b8c1-087c-4f20-b5b8-b3954fee7da{}"
    save_key(tab, api_key)
    upload(tab, tmp_path, "IMG_20240101_123456_a_very_long_file_name_from_a_phone.png")
    tab.wait_for_function(RESULTS_SHOWN)
    assert "bca1b8c1-087c-4f20-b5b8-b3954fee7da1" in tab.inner_text("#job-details")
    width = tab.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 360, width
    card = tab.eval_on_selector("#results", "e => [e.scrollWidth, e.clientWidth]")
    assert card[0] <= card[1], card


def test_page_a_reload_follows_the_job_again(
    page: tuple[Any, str], api_key: str, tmp_path: Path
) -> None:
    """Reloading the page lost the job (it was only in the page's memory): its id goes in the
    URL, and a reload follows it again and shows its result, the server's overlay standing in
    for the photo the page no longer holds."""
    tab, _ = page
    jobs = FakeJobs(tab, [(200, FakeJobs.job("running"))])
    save_key(tab, api_key)
    upload(tab, tmp_path, "cat.png")
    tab.wait_for_function(
        "() => document.getElementById('status-text').textContent.startsWith('A worker')"
    )
    assert tab.url.endswith("/#job=job-1")
    tab.reload()
    tab.wait_for_selector("body[data-ready='true']")
    tab.wait_for_function(
        "() => document.getElementById('status-text').textContent.startsWith('A worker')"
    )
    jobs.polls = [(200, FakeJobs.job("succeeded"))]
    tab.wait_for_function(RESULTS_SHOWN, timeout=30_000)
    assert jobs.seen.count("GET /v1/jobs/job-1/overlay.png") == 1
    shown = page_png(tab, "#overlay-img", "src").convert("RGB")
    assert shown.getpixel((0, 0)) == (200, 0, 0)  # FakeJobs' overlay
    assert tab.is_disabled("#show-original")
    assert tab.inner_text("#left-caption") == "Overlay"
    with tab.expect_download() as download:  # the overlay fetched already
        tab.click("#download-overlay")
    assert download.value.suggested_filename == "job-1-overlay.png"
    assert jobs.seen.count("GET /v1/jobs/job-1/overlay.png") == 1

    upload(tab, tmp_path, "dog.png")  # a new photo: the URL names its job
    wait_for_request(tab, jobs, "GET /v1/jobs/job-2")
    assert tab.url.endswith("/#job=job-2")


def test_page_small_words_and_limits(
    page: tuple[Any, str], api_key: str, tmp_path: Path, settings: Any
) -> None:
    """After "Forget" the key hint showed its backticks; a small file was "(0 KB)"; the page never
    checked the pixel limit it was given, and sent a photo the server then refused."""
    tab, url = page
    jobs = FakeJobs(tab, [(200, FakeJobs.job("queued"))], hold={"POST /v1/jobs"})
    save_key(tab, api_key)
    tab.click("#key-forget")
    hint = tab.eval_on_selector("#key-state", "e => e.innerHTML")
    assert hint == (
        "No key saved yet. <code>make run</code> prints one (also in "
        "<code>var/local_api_key</code>)."
    )
    save_key(tab, api_key)
    photo = tmp_path / "cat.png"
    photo.write_bytes(png_bytes("RGB", (0, 128, 0)))
    tab.set_input_files("#file-input", str(photo))
    wait_for_request(tab, jobs, "POST /v1/jobs")
    size = photo.stat().st_size
    assert tab.inner_text("#status-text") == f"Uploading cat.png ({size} bytes)\u2026"

    config = {
        "auth_required": True,
        "max_upload_bytes": settings.max_upload_bytes,
        "max_pixels": 11,
    }
    tab.route("**/ui/config.json", lambda route: route.fulfill(json=config))
    tab.goto(url)  # no job in the URL yet: a fresh page
    tab.wait_for_selector("body[data-ready='true']")
    tab.set_input_files("#file-input", str(photo))  # 4 x 3: 12 pixels
    tab.wait_for_selector("#error-box:not([hidden])")
    assert tab.inner_text("#error-box") == (
        "That file could not be used as an image. "
        "The image has 12 pixels, more than the limit of 11."
    )
    assert jobs.uploads == 0
    assert jobs.seen == ["POST /v1/jobs"]  # the held one only
    assert tab.is_hidden("#progress-box")
