"""The web page in real headless Chromium (Debian's package) driven by Playwright."""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from PIL import Image, ImageOps

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


Answer = tuple[int, Any] | str  # (status, JSON body or raw text), or "abort": a network error


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
            return self.send(route, (202, {"id": f"job-{self.uploads}", **self.job("queued")}))
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
    assert tab.get_attribute("#download-overlay", "download").endswith("-overlay.png")
    assert tab.is_hidden("#error-box")
    shot = screenshot(tab, tmp_path, "page-result.png")
    with Image.open(shot) as img:
        assert img.width >= 1200

    tab.check("#show-original")
    assert tab.inner_text("#left-caption") == "Original photo"
    tab.reload()
    tab.wait_for_selector("body[data-ready='true']")
    assert "Key saved" in tab.inner_text("#key-state")  # the key survives a reload


@pytest.mark.e2e
def test_page_waits_out_a_busy_server_for_the_results(
    page: tuple[Any, str], api_key: str, worker: Path
) -> None:
    """A result over 4 MP is drawn one at a time per API process: the page waits as the 503's
    Retry-After says instead of giving up on a finished job (it offered no way to try again)."""
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
    tab.set_input_files("#file-input", str(sample_images(1)[0]))
    tab.wait_for_function(
        "() => !document.getElementById('results').hidden"
        " && document.getElementById('overlay-img').naturalWidth > 0",
        timeout=120_000,
    )
    assert len(busy) == 1, worker.read_text()[-2000:]
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
    jobs = FakeJobs(tab, polls, images={"/v1/jobs/job-1/overlay.png": [bad_gateway, "abort"]})
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
    jobs.hold = {"GET /v1/jobs/job-3/overlay.png"}
    upload(tab, tmp_path, "third.png")
    wait_for_request(tab, jobs, "GET /v1/jobs/job-3/overlay.png")
    upload(tab, tmp_path, "fourth.png")
    tab.wait_for_function(
        "() => document.getElementById('job-details').textContent.includes('job-4')"
    )
    gone = (404, {"error": "not_found", "message": "No such job."})
    jobs.send(jobs.held.pop("GET /v1/jobs/job-3/overlay.png"), gone)
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
    and every download, behind one error."""
    tab, _ = page
    gone = (410, {"error": "gone", "message": "The input image of job job-1 is no longer stored."})
    FakeJobs(
        tab,
        [(200, FakeJobs.job("succeeded"))],
        images={"/v1/jobs/job-1/overlay.png": [gone]},
    )
    save_key(tab, api_key)
    upload(tab, tmp_path, "cat.png")
    tab.wait_for_function("() => !document.getElementById('results').hidden", timeout=30_000)
    assert tab.evaluate("() => document.getElementById('mask-canvas').width") == 4
    assert "no longer stored" in tab.inner_text("#error-box")
    assert tab.inner_text("#left-caption") == "Original photo"
    assert tab.is_hidden("#download-overlay")
    assert tab.get_attribute("#download-mask", "href")


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
    assert tab.inner_text("#error-box") == (
        "One photo at a time: sending a.png; the other 2 were not sent."
    )


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
