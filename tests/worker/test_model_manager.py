"""Model versions in a worker: canary routing, hot swaps, rejected versions never serving."""

from __future__ import annotations

import io
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from segsvc.db import session_scope
from segsvc.models import ModelStatus
from segsvc.services import registry, rollout
from segsvc.settings import Settings
from tests.conftest import start_worker, stop_process
from tests.segsvc.test_feedback import photo_bytes
from tests.segsvc.test_rollout import canary
from worker import model_manager
from worker.model_manager import ModelManager


def register(
    settings: Settings, path: Path, version: str, status: ModelStatus = ModelStatus.CANDIDATE
) -> None:
    with session_scope(settings) as session:
        registry.register_version(session=session, version=version, path=path, status=status)


def start_canary(settings: Settings, version: str, share: float) -> None:
    with session_scope(settings) as session:
        rollout.start_canary(session=session, version=version, share=share)


def set_status(settings: Settings, version: str, action: str) -> None:
    with session_scope(settings) as session:
        if action == "promote":
            rollout.promote(session=session, version=version)
        else:
            rollout.reject(session=session, version=version, reason="test")


@pytest.fixture
def manager(settings: Settings, production_model: str):  # type: ignore[no-untyped-def]
    mgr = ModelManager(settings.model_copy(update={"runtime": "keras", "registry_poll_seconds": 0}))
    yield mgr
    mgr.close()


def test_manager_routes_the_canary_share_by_job_id_hash(
    manager: ModelManager, settings: Settings, model_file: Path
) -> None:
    assert manager.load().version == "test-v1"
    register(settings, model_file, "rejected-one", ModelStatus.REJECTED)
    register(settings, model_file, "cand")
    assert manager.refresh() is False  # a candidate or rejected version changes nothing
    start_canary(settings, "cand", 0.5)
    assert manager.refresh() is True
    ids = [uuid.uuid4() for _ in range(400)]
    served = {i: manager.model_for(i).version for i in ids}
    assert set(served.values()) == {"test-v1", "cand"}
    for job_id, version in served.items():
        assert (version == "cand") == rollout.routes_to_canary(job_id, 0.5)
    assert "rejected-one" not in served.values()


def test_manager_promotes_without_reloading_and_drops_rejected(
    manager: ModelManager, settings: Settings, model_file: Path
) -> None:
    manager.load()
    canary(settings, model_file, "cand", share=0.2)
    manager.refresh()
    canary_model = manager.routing.canary
    assert canary_model is not None
    set_status(settings, "cand", "promote")
    assert manager.refresh() is True
    assert manager.routing.production is canary_model  # switched, not loaded again
    assert manager.routing.canary is None

    canary(settings, model_file, "next", share=1.0)
    manager.refresh()
    assert manager.model_for(uuid.uuid4()).version == "next"
    set_status(settings, "next", "reject")
    assert manager.refresh() is True
    assert {manager.model_for(uuid.uuid4()).version for _ in range(50)} == {"cand"}


def test_a_canary_no_longer_wanted_stops_serving_before_the_next_version_loads(
    manager: ModelManager, settings: Settings, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: a rejected canary kept its share of jobs until the version replacing it had
    # converted and loaded, minutes later.
    from worker import model_manager

    manager.load()
    canary(settings, model_file, "first", share=1.0)
    manager.refresh()
    assert manager.model_for(uuid.uuid4()).version == "first"
    canary(settings, model_file, "second", share=1.0)  # rejects "first"
    real = model_manager.load_model_version
    seen: list[set[str]] = []

    def slow(*args: object, **kwargs: object) -> object:
        seen.append({manager.model_for(uuid.uuid4()).version for _ in range(20)})
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(model_manager, "load_model_version", slow)
    assert manager.refresh() is True
    assert seen == [{"test-v1"}]  # while "second" loaded: production only
    assert manager.model_for(uuid.uuid4()).version == "second"


def test_a_canary_rejected_while_it_loaded_is_not_installed_from_the_stale_read(
    manager: ModelManager, settings: Settings, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry read before a minutes-long load was installed after it: a canary rejected
    meanwhile served its share until the next poll."""
    from worker import model_manager

    manager.load()
    canary(settings, model_file, "late", share=1.0)
    real = model_manager.load_model_version

    def reject_while_loading(*args: object, **kwargs: object) -> object:
        loaded = real(*args, **kwargs)  # type: ignore[arg-type]
        set_status(settings, "late", "reject")  # an operator, during the load
        return loaded

    monkeypatch.setattr(model_manager, "load_model_version", reject_while_loading)
    manager.refresh()
    assert manager.routing.canary is None
    assert {manager.model_for(uuid.uuid4()).version for _ in range(20)} == {"test-v1"}


def test_first_load_installs_a_canary_rejected_during_the_load(
    settings: Settings, production_model: str, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first load read the registry once, loaded (converted: minutes), then installed what
    it read: a canary rejected meanwhile served its share until the worker's first poll."""
    canary(settings, model_file, "late", share=1.0)
    real = model_manager.load_model_version

    def reject_while_loading(*args: object, **kwargs: object) -> object:
        loaded = real(*args, **kwargs)  # type: ignore[arg-type]
        if kwargs.get("version") == "late":
            set_status(settings, "late", "reject")  # an operator, during the load
        return loaded

    monkeypatch.setattr(model_manager, "load_model_version", reject_while_loading)
    mgr = ModelManager(settings.model_copy(update={"runtime": "keras", "registry_poll_seconds": 0}))
    try:
        mgr.load()
        assert mgr.routing.canary is None
        assert {mgr.model_for(uuid.uuid4()).version for _ in range(20)} == {"test-v1"}
    finally:
        mgr.close()


def test_a_registry_that_cannot_be_read_after_a_load_keeps_what_was_loaded(
    manager: ModelManager, settings: Settings, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-read after a minutes-long load failed (a statement timeout): the load was thrown
    away, to be done again at the next poll."""
    manager.load()
    canary(settings, model_file, "fresh", share=1.0)
    real_wanted = manager._wanted
    reads: list[int] = []

    def then_down() -> object:
        reads.append(1)
        if len(reads) > 1:
            raise ConnectionError("the database went away")
        return real_wanted()

    monkeypatch.setattr(manager, "_wanted", then_down)
    assert manager.refresh() is True
    assert manager.model_for(uuid.uuid4()).version == "fresh"


def canary_row(settings: Settings, version: str) -> tuple[str, str]:
    with session_scope(settings) as session:
        row = registry.get_version(session=session, version=version)
        return row.status, row.reason or ""


def test_manager_keeps_serving_when_a_canary_cannot_load(
    manager: ModelManager, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One failure may be passing (and on one worker): the canary leaves this worker's routing
    at once, but the registry rejects it for everyone only when the retry fails too."""
    from worker import model_manager

    manager.load()
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a model")
    canary(settings, broken, "broken", share=1.0)
    manager.refresh()
    assert manager.routing.canary is None
    assert manager.model_for(uuid.uuid4()).version == "test-v1"
    assert manager.refresh() is False  # not retried every poll
    assert canary_row(settings, "broken")[0] == "canary"  # other workers may load it fine
    monkeypatch.setattr(model_manager, "BROKEN_RETRY_S", 0.0)  # ...but after a while
    manager.refresh()
    assert manager.routing.canary is None
    status, reason = canary_row(settings, "broken")
    assert status == "rejected"
    assert "could not load (2 tries" in reason


def fail_loads(monkeypatch: pytest.MonkeyPatch, *errors: Exception) -> list[str]:
    """Make the next loads raise `errors` in turn, then load for real; returns the versions."""
    from worker import model_manager

    real = model_manager.load_model_version
    calls: list[str] = []

    def flaky(*args: object, **kwargs: object) -> object:
        calls.append(str(kwargs["version"]))
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(model_manager, "load_model_version", flaky)
    return calls


def test_a_canary_whose_conversion_fails_alike_twice_is_rejected_at_once(
    manager: ModelManager, settings: Settings, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segsvc.ml.convert import ConversionError

    manager.load()
    canary(settings, model_file, "cand", share=1.0)
    fail_loads(monkeypatch, ConversionError("converting: ValueError: bad", deterministic=True))
    manager.refresh()
    assert manager.routing.canary is None
    status, reason = canary_row(settings, "cand")
    assert status == "rejected"
    assert "conversion fails the same way" in reason


def test_a_canary_that_loads_on_its_retry_serves_and_is_never_rejected(
    manager: ModelManager, settings: Settings, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segsvc.ml.convert import ConversionError
    from worker import model_manager

    manager.load()
    canary(settings, model_file, "cand", share=1.0)
    oom = ConversionError("converting: killed by signal 9", deterministic=False)
    calls = fail_loads(monkeypatch, oom)
    manager.refresh()
    assert manager.routing.canary is None
    assert canary_row(settings, "cand")[0] == "canary"
    monkeypatch.setattr(model_manager, "BROKEN_RETRY_S", 0.0)
    manager.refresh()
    assert calls == ["cand", "cand"]
    assert manager.model_for(uuid.uuid4()).version == "cand"
    assert canary_row(settings, "cand")[0] == "canary"


def test_a_production_version_that_failed_to_load_is_tried_again_later(
    manager: ModelManager,
    settings: Settings,
    model_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A passing failure (memory, storage) must not leave the worker on the old version for
    the rest of its life: it keeps serving the old one, then loads the new one on a later poll."""
    from worker import model_manager

    manager.load()
    real = model_manager.load_model_version
    calls = []

    def flaky(*args: object, **kwargs: object) -> object:
        calls.append(kwargs["version"])
        if len(calls) == 1:
            raise OSError("storage hiccup")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(model_manager, "load_model_version", flaky)
    register(settings, model_file, "next")
    set_status(settings, "next", "promote")
    with pytest.raises(OSError, match="storage hiccup"):
        manager.refresh()
    assert manager.model_for(uuid.uuid4()).version == "test-v1"  # still serving
    assert manager.refresh() is False  # not retried on every poll
    assert calls == ["next"]
    monkeypatch.setattr(model_manager, "BROKEN_RETRY_S", 0.0)  # ...but after a while
    assert manager.refresh() is True
    assert calls == ["next", "next"]
    assert manager.model_for(uuid.uuid4()).version == "next"


class FailingRuntime:
    name = "failing"
    error: type[Exception] = RuntimeError
    match: str | None = "kernel exploded"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("kernel exploded")


def test_canary_that_fails_at_inference_is_rolled_back_at_once(
    manager: ModelManager, settings: Settings, model_file: Path
) -> None:
    manager.load()
    canary(settings, model_file, "cand", share=1.0)
    manager.refresh()
    assert manager.model_for(uuid.uuid4()).version == "cand"
    fail_canary(manager)
    assert manager.model_for(uuid.uuid4()).version == "test-v1"  # this worker: at once
    with session_scope(settings) as session:  # every other worker: at its next poll
        row = registry.get_version(session=session, version="cand")
        assert (row.status, row.traffic_share) == ("rejected", 0.0)
        assert "failed at inference" in (row.reason or "")
    assert manager.refresh() is False


class OutOfMemoryRuntime:
    name = "oom"
    error: type[Exception] = MemoryError
    match: str | None = None

    def predict(self, batch: np.ndarray) -> np.ndarray:
        raise MemoryError


def test_a_canary_out_of_memory_once_on_one_worker_is_not_rejected_for_everyone(
    manager: ModelManager, settings: Settings, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: one MemoryError on one busy worker rejected the canary in the registry, and
    # with it the retraining run's model, before it had collected a verdict.
    from worker import model_manager

    manager.load()
    canary(settings, model_file, "cand", share=1.0)
    manager.refresh()
    fail_canary(manager, OutOfMemoryRuntime())
    assert manager.model_for(uuid.uuid4()).version == "test-v1"  # this worker: at once
    assert canary_row(settings, "cand")[0] == "canary"  # the fleet: still a canary
    assert manager.refresh() is False  # not retried on every poll
    monkeypatch.setattr(model_manager, "BROKEN_RETRY_S", 0.0)  # ...but after a while
    assert manager.refresh() is True
    assert manager.model_for(uuid.uuid4()).version == "cand"
    # Out of memory again on the same worker within the hour: no longer passing (an hour
    # later it would be a first failure again).
    fail_canary(manager, OutOfMemoryRuntime())
    status, reason = canary_row(settings, "cand")
    assert status == "rejected"
    assert "MemoryError" in reason


def test_a_canary_promoted_after_a_passing_failure_here_is_served_at_once(
    manager: ModelManager, settings: Settings, model_file: Path
) -> None:
    """A canary out of memory once on this worker (passing: still a canary for the fleet),
    then promoted: this worker kept serving the archived version for BROKEN_RETRY_S, as it
    would for a version that fails to load."""
    manager.load()
    canary(settings, model_file, "cand", share=1.0)
    manager.refresh()
    fail_canary(manager, OutOfMemoryRuntime())
    assert manager.model_for(uuid.uuid4()).version == "test-v1"
    with session_scope(settings) as session:
        rollout.promote(session=session, version="cand", reason="test")
    assert manager.refresh() is True
    assert manager.routing.production.version == "cand"


def test_a_canary_out_of_memory_twice_hours_apart_is_not_rejected(
    manager: ModelManager, settings: Settings, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import model_manager

    manager.load()
    canary(settings, model_file, "cand", share=1.0)
    monkeypatch.setattr(model_manager, "BROKEN_RETRY_S", 0.0)
    monkeypatch.setattr(model_manager, "RUN_FAILURE_WINDOW_S", 0.2)
    for _ in range(2):
        manager.refresh()
        fail_canary(manager, OutOfMemoryRuntime())
        time.sleep(0.3)  # past the window
    assert canary_row(settings, "cand")[0] == "canary"


def fail_canary(
    manager: ModelManager, runtime: FailingRuntime | OutOfMemoryRuntime | None = None
) -> None:
    """Make the serving canary raise at inference (`runtime`'s error, FailingRuntime's by
    default), as a batch would see it."""
    failing = runtime or FailingRuntime()
    serving = manager.routing.canary
    assert serving is not None
    serving.runtime.inner = failing  # type: ignore[attr-defined]
    with pytest.raises(failing.error, match=failing.match):
        serving.runtime.predict(np.zeros((1, 128, 128, 3), np.float32))


def test_a_refresh_that_read_the_registry_before_a_canary_failed_does_not_restore_it(
    manager: ModelManager, settings: Settings, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager.load()
    canary(settings, model_file, "cand", share=1.0)
    manager.refresh()
    real_wanted = manager._wanted
    reads: list[object] = []

    def wanted_then_canary_fails() -> object:
        wanted = real_wanted()  # the first read still lists the canary...
        if not reads:
            fail_canary(manager)  # ...which fails at inference before the new table is built
        reads.append(wanted)
        return wanted

    monkeypatch.setattr(manager, "_wanted", wanted_then_canary_fails)
    manager.refresh()
    assert manager.routing.canary is None
    assert {manager.model_for(uuid.uuid4()).version for _ in range(20)} == {"test-v1"}


class SwitchDuringFailure(dict):  # type: ignore[type-arg]
    """`_broken` of a manager: when the failing canary is recorded, a refresh that switches
    to a new production runs in another thread (as the poller would) and gets as far as it can
    in a moment."""

    def __init__(self, manager: ModelManager) -> None:
        super().__init__()
        self.manager = manager
        self.built = threading.Event()
        self.thread: threading.Thread | None = None

    def __setitem__(self, key: object, value: object) -> None:
        super().__setitem__(key, value)
        if self.thread is None:
            self.thread = threading.Thread(target=self.manager.refresh)
            self.thread.start()
            # The refresh gets as far as it can (it may wait for the routing lock this
            # failure holds, before or after loading the new production).
            self.built.wait(2)
            self.thread.join(0.5)


def test_a_failing_canary_never_restores_a_production_switched_in_meanwhile(
    manager: ModelManager, settings: Settings, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager.load()
    canary(settings, model_file, "cand", share=1.0)
    manager.refresh()
    register(settings, model_file, "next")
    set_status(settings, "next", "promote")
    hook = SwitchDuringFailure(manager)
    real_build = manager._build

    def build(*args: object, **kwargs: object) -> object:
        try:
            return real_build(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            hook.built.set()

    monkeypatch.setattr(manager, "_build", build)
    monkeypatch.setattr(manager, "_broken", hook)
    fail_canary(manager)
    assert hook.thread is not None
    hook.thread.join(60)
    assert manager.routing.production.version == "next"
    assert manager.routing.canary is None


def submit(client, auth) -> str:  # type: ignore[no-untyped-def]
    resp = client.post(
        "/v1/jobs",
        headers=auth,
        content_type="multipart/form-data",
        data={"image": (io.BytesIO(photo_bytes()), "p.jpg")},
    )
    assert resp.status_code == 202
    return str(resp.get_json()["id"])


def finish_all(client, auth, ids: list[str], log: Path, timeout: float = 120) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Wait for every job; each must succeed. Returns id -> model version."""
    deadline, out = time.monotonic() + timeout, {}
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        body = client.get(f"/v1/jobs/{pending[0]}", headers=auth).get_json()
        if body["status"] in ("queued", "running"):
            time.sleep(0.1)
            continue
        assert body["status"] == "succeeded", (body, log.read_text()[-3000:])
        out[pending.pop(0)] = body["model_version"]
    assert not pending, log.read_text()[-3000:]
    return out


def submit_until(
    client,
    auth,
    ids: list[str],
    log: Path,
    version: str,  # type: ignore[no-untyped-def]
    timeout: float = 120,
) -> None:
    """Keep jobs coming until one is served by `version`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids.extend(submit(client, auth) for _ in range(3))
        if version in finish_all(client, auth, ids[-3:], log).values():
            return
    raise AssertionError(f"{version} never served:\n{log.read_text()[-3000:]}")


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_worker_hot_swaps_versions_without_a_failed_job(  # type: ignore[no-untyped-def]
    client,
    auth,
    admin_key: str,
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
) -> None:
    log = tmp_path / "worker.log"
    register(settings, model_file, "v2")
    register(settings, model_file, "never", ModelStatus.REJECTED)
    proc = start_worker(settings, log, SEG_REGISTRY_POLL_SECONDS="0.3", SEG_RUNTIME="keras")
    try:
        ids = [submit(client, auth) for _ in range(4)]
        admin = {"Authorization": f"Bearer {admin_key}"}
        assert client.post("/v1/models/v2/promote", headers=admin).status_code == 200
        submit_until(client, auth, ids, log, "v2")  # jobs keep flowing while the swap happens
        time.sleep(1.0)  # every poll after the switch has seen it
        after = [submit(client, auth) for _ in range(6)]
        served = finish_all(client, auth, ids + after, log)
        assert {served[i] for i in after} == {"v2"}
        assert set(served.values()) <= {"test-v1", "v2"}

        canary(settings, model_file, "v3", share=0.5)
        canary_ids: list[str] = []
        submit_until(client, auth, canary_ids, log, "v3")
        time.sleep(1.0)
        split = [submit(client, auth) for _ in range(16)]
        served = finish_all(client, auth, split, log)
        for job_id in split:
            expected = "v3" if rollout.routes_to_canary(job_id, 0.5) else "v2"
            assert served[job_id] == expected

        set_status(settings, "v3", "reject")
        # Until a job the canary's share would take is served by v2, the poll has not seen
        # the rejection (a fixed sleep raced the poll thread on a loaded host).
        deadline = time.monotonic() + 60
        while True:
            probe = submit(client, auth)
            taken = rollout.routes_to_canary(probe, 0.5)  # the canary's share would take it
            if taken and finish_all(client, auth, [probe], log)[probe] == "v2":
                break
            assert time.monotonic() < deadline, log.read_text()[-3000:]
        later = finish_all(client, auth, [submit(client, auth) for _ in range(8)], log)
        assert set(later.values()) == {"v2"}
    finally:
        stop_process(proc)
    text = log.read_text()
    assert "loaded model never" not in text  # the rejected version was never even loaded
    assert "serving v2" in text


def test_wanted_carries_the_versions_faithful_runtimes() -> None:
    from segsvc.models import ModelVersion
    from worker.model_manager import _wanted

    row = ModelVersion(
        version="v",
        path="p",
        sha256="s",
        traffic_share=1.0,
        metrics={"faithful_runtimes": ["onnx", "litert-int8"]},
    )
    assert _wanted(row).faithful == ("onnx", "litert-int8")
    # Measured with other converters (a TensorFlow or LiteRT upgrade since): not taken here.
    row.metrics = {
        "faithful_runtimes": ["onnx", "litert-int8"],
        "runtime_agreement": {"litert-int8": {"converter": "000000000000"}},
    }
    assert _wanted(row).faithful == ("onnx",)
    assert _wanted(row).stale == ("litert-int8",)
    assert (
        _wanted(
            ModelVersion(version="v", path="p", sha256="s", traffic_share=0.0, metrics={})
        ).faithful
        == ()
    )


class StubRuntime:
    """A converted runtime that is never loaded from disk (no conversion in these tests)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.zeros_like(batch)


def stub_cache_worker(
    settings: Settings, cache: Path, monkeypatch: pytest.MonkeyPatch, **update: object
) -> Settings:
    """Settings of a worker serving ONNX from the artifact cache `cache`, its runtime stubbed
    (nothing is converted or loaded from disk)."""
    from worker import model_manager

    monkeypatch.setattr(model_manager, "load_runtime", lambda path, *, kind, **_: StubRuntime(kind))
    return settings.model_copy(update={"runtime": "onnx", "artifact_cache_dir": cache, **update})


def test_a_polling_worker_marks_its_artifacts_used_and_prunes_the_rest(
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from segsvc.digest import file_sha256
    from tests.segsvc.ml.test_artifact_cache import cached

    cfg = stub_cache_worker(settings, tmp_path, monkeypatch, registry_poll_seconds=0.05)
    sha = file_sha256(model_file)
    serving = cached(tmp_path, sha)  # every folder last used 10 days ago
    upgraded_away = cached(tmp_path, sha, name="onnx-000000000000")
    retired = cached(tmp_path, "bb" * 32)
    mgr = ModelManager(cfg)
    try:
        assert mgr.load().version == production_model
        deadline = time.monotonic() + 30
        while (upgraded_away.exists() or retired.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)  # the poll thread tends the cache as it starts
    finally:
        mgr.close()
    assert not upgraded_away.exists()
    assert not retired.exists()
    assert (serving / "model.onnx").is_file()
    assert serving.stat().st_mtime > time.time() - 60  # marked used by the worker serving it


def test_a_worker_that_does_not_poll_still_marks_its_artifacts_used(
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With registry polling off (SEG_REGISTRY_POLL_SECONDS=0) the worker still serves from its
    # folder for days: a pruner elsewhere must not take it for unused.
    from segsvc.digest import file_sha256
    from tests.segsvc.ml.test_artifact_cache import cached
    from worker import model_manager

    monkeypatch.setattr(model_manager, "CACHE_TEND_S", 0.05)
    cfg = stub_cache_worker(settings, tmp_path, monkeypatch, registry_poll_seconds=0)
    serving = cached(tmp_path, file_sha256(model_file))  # last used 10 days ago
    mgr = ModelManager(cfg)
    try:
        assert mgr.load().version == production_model
        old = time.time() - 86400
        os.utime(serving, (old, old))  # as if the load were a day ago
        deadline = time.monotonic() + 10
        while serving.stat().st_mtime < time.time() - 60 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        mgr.close()
    assert serving.stat().st_mtime > time.time() - 60


@pytest.mark.parametrize(
    ("poll_seconds", "refresh_blocks"), [(30.0, False), (0.01, True)], ids=["slow-poll", "busy"]
)
def test_served_artifacts_stay_marked_used_whatever_the_registry_poll_does(
    settings: Settings,
    production_model: str,
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    poll_seconds: float,
    refresh_blocks: bool,
) -> None:
    # Regression: the poll thread marked the folders only between refreshes, so a refresh
    # converting a new version for many minutes, or a long SEG_REGISTRY_POLL_SECONDS, left the
    # folder being served unmarked for longer than a short SEG_ARTIFACT_GRACE_HOURS.
    from segsvc.digest import file_sha256
    from tests.segsvc.ml.test_artifact_cache import cached
    from worker import model_manager

    monkeypatch.setattr(model_manager, "CACHE_TEND_S", 0.05)
    cfg = stub_cache_worker(settings, tmp_path, monkeypatch, registry_poll_seconds=poll_seconds)
    serving = cached(tmp_path, file_sha256(model_file))
    mgr = ModelManager(cfg)
    released = threading.Event()
    if refresh_blocks:

        def converting() -> bool:
            released.wait(30)
            return False

        monkeypatch.setattr(mgr, "refresh", converting)
    try:
        assert mgr.load().version == production_model
        time.sleep(0.2)  # the poll thread is in its wait, or inside the blocked refresh
        old = time.time() - 86400
        os.utime(serving, (old, old))
        deadline = time.monotonic() + 5
        while serving.stat().st_mtime < time.time() - 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert serving.stat().st_mtime > time.time() - 60
    finally:
        released.set()
        mgr.close()


def test_a_version_measured_with_other_converters_is_served_exactly_and_said_so(
    settings: Settings,
    production_model: str,
    model_file: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from segsvc.ml import runtime

    monkeypatch.setattr(runtime, "gpu_visible", lambda: False)  # a GPU host serves XLA anyway
    with session_scope(settings) as session:
        registry.register_version(
            session=session,
            version="upgraded",
            path=model_file,
            metrics={  # every kind measured by other converters, as after a TensorFlow upgrade
                "faithful_runtimes": ["onnx", "litert-int8"],
                "runtime_agreement": {
                    "onnx": {"converter": "000000000000"},
                    "litert-int8": {"converter": "000000000000"},
                },
            },
        )
    start_canary(settings, "upgraded", 1.0)
    mgr = ModelManager(settings.model_copy(update={"runtime": "auto", "registry_poll_seconds": 0}))
    try:
        with caplog.at_level("WARNING", logger="worker.model_manager"):
            mgr.load()
        loaded = mgr.routing.canary
        assert loaded is not None
        assert loaded.version == "upgraded"
        # Not the LiteRT int8 this worker would build, whose masks nobody measured: exact ONNX.
        assert loaded.runtime.name == "onnx"
        assert "litert-int8 was measured faithful with other converters" in caplog.text
        assert "segsvc models check-runtimes --version upgraded" in caplog.text
    finally:
        mgr.close()


def test_a_failed_first_load_is_retried_by_the_readiness_thread_only(
    manager: ModelManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before any version served, each batch's claim loaded (converted) the model again after a
    failed first load, one after another, each holding the model thread for the conversion."""
    calls: list[str] = []

    def failing(settings: Settings, *, version: str, **_: object) -> Any:
        calls.append(version)
        raise model_manager.ConversionError("conversion failed", deterministic=True)

    monkeypatch.setattr(model_manager, "load_model_version", failing)
    with pytest.raises(model_manager.ConversionError):
        manager.load()
    for _ in range(5):  # five batches' claims within a second: the failure at once
        with pytest.raises(model_manager.ModelNotLoadedError, match="conversion failed"):
            manager.load()
    assert calls == ["test-v1"]
    with pytest.raises(model_manager.ConversionError):
        manager.load(retry=True)  # the readiness thread's retry does load
    assert len(calls) == 2
    monkeypatch.setattr(model_manager, "FIRST_LOAD_BACKOFF_S", 0.0)  # the backoff has passed
    with pytest.raises(model_manager.ConversionError):
        manager.load()
    assert len(calls) == 3


def test_a_version_no_longer_served_leaves_the_metrics(
    manager: ModelManager, settings: Settings, model_file: Path
) -> None:
    """One forward-pass histogram per version ever served: the worker's memory and /metrics
    grew with every retraining that reached it."""
    from prometheus_client import REGISTRY

    from segsvc.metrics import PREDICT_TIME

    def count(version: str) -> float | None:
        labels = {"model_version": version}
        return REGISTRY.get_sample_value("segsvc_batch_predict_seconds_count", labels)

    manager.load()
    before = count("test-v1") or 0.0  # batches on it in earlier tests of this process
    PREDICT_TIME.labels("test-v1").observe(0.01)  # as a batch on it does
    register(settings, model_file, "v2")
    with session_scope(settings) as session:
        rollout.promote(session=session, version="v2", reason="test")
    assert count("test-v1") == before + 1
    assert manager.refresh() is True
    assert manager.routing.production.version == "v2"
    assert count("test-v1") is None


def model_info() -> dict[str, str]:
    """The labels of `segsvc_model_info` (one sample: `Info` replaces it whole)."""
    from prometheus_client import REGISTRY

    [sample] = [s for m in REGISTRY.collect() if m.name == "segsvc_model" for s in m.samples]
    return dict(sample.labels)


def load_times() -> dict[str, float]:
    """`segsvc_model_load_seconds` by version."""
    from prometheus_client import REGISTRY

    return {
        s.labels["model_version"]: s.value
        for m in REGISTRY.collect()
        if m.name == "segsvc_model_load_seconds"
        for s in m.samples
    }


def test_the_model_series_follow_every_switch(
    manager: ModelManager, settings: Settings, model_file: Path
) -> None:
    """`segsvc_model_info` and `segsvc_model_load_seconds` were set once, at the worker's
    first load: after a canary started, a promotion or a rollback they still named the version
    it started with (and never a canary)."""
    from segsvc.metrics import MODEL_LOAD_TIME

    MODEL_LOAD_TIME.clear()  # other tests' versions
    first = manager.load()
    sha = first.sha256[:12]
    assert model_info() == {
        "production": "test-v1",
        "sha256": sha,
        "runtime": "keras",
        "canary": "",
        "canary_runtime": "",
    }
    assert load_times() == {"test-v1": first.load_seconds}

    canary(settings, model_file, "cand", share=0.2)
    assert manager.refresh() is True
    cand = manager.routing.canary
    assert cand is not None
    assert (model_info()["production"], model_info()["canary"]) == ("test-v1", "cand")
    assert model_info()["canary_runtime"] == "keras"
    assert load_times() == {"test-v1": first.load_seconds, "cand": cand.load_seconds}

    set_status(settings, "cand", "promote")
    assert manager.refresh() is True
    assert (model_info()["production"], model_info()["canary"]) == ("cand", "")
    assert model_info()["sha256"] == cand.sha256[:12]
    assert load_times() == {"cand": cand.load_seconds}  # promoted: loaded once, as a canary

    with session_scope(settings) as session:
        rollout.rollback(session=session, reason="test")
    assert manager.refresh() is True
    assert manager.routing.production.version == "test-v1"
    assert (model_info()["production"], model_info()["canary"]) == ("test-v1", "")
    assert set(load_times()) == {"test-v1"}  # loaded again: its new load time


def test_a_canary_dropped_after_failing_at_inference_leaves_the_model_series(
    manager: ModelManager, settings: Settings, model_file: Path
) -> None:
    from segsvc.metrics import MODEL_LOAD_TIME

    MODEL_LOAD_TIME.clear()
    manager.load()
    canary(settings, model_file, "cand", share=1.0)
    manager.refresh()
    assert model_info()["canary"] == "cand"
    fail_canary(manager)
    assert (model_info()["production"], model_info()["canary"]) == ("test-v1", "")
    assert set(load_times()) == {"test-v1"}


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A U-Net with other random weights: what a `git pull` of a new baseline, or a
    `segsvc train --out` over a registered file, puts at the registered path."""
    from segsvc.ml.unet import build_unet

    path = tmp_path_factory.mktemp("other") / "other.keras"
    build_unet().save(path)
    return path


def replace_file(path: Path, other: Path) -> None:
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_bytes(other.read_bytes())
    os.replace(tmp, path)


@pytest.mark.parametrize("runtime", ["keras", "onnx"])
def test_a_version_whose_file_was_replaced_at_its_path_is_not_served(
    settings: Settings, model_file: Path, other_weights: Path, tmp_path: Path, runtime: str
) -> None:
    from segsvc.digest import file_sha256
    from segsvc.ml.convert import ModelFileMismatchError

    path = tmp_path / "baseline.keras"
    path.write_bytes(model_file.read_bytes())
    register(settings, path, "v-a", ModelStatus.PRODUCTION)
    replace_file(path, other_weights)
    cache = tmp_path / "artifacts"
    cfg = settings.model_copy(
        update={"runtime": runtime, "registry_poll_seconds": 0, "artifact_cache_dir": cache}
    )
    manager = ModelManager(cfg)
    try:
        with pytest.raises(ModelFileMismatchError, match="sha256"):
            manager.load()
    finally:
        manager.close()
    assert not manager.loaded
    # Nothing converted from the other weights under v-a's sha256 (or any other).
    assert not [p for p in cache.rglob("*") if p.suffix in (".onnx", ".tflite")]
    # The registered file back at its path: it serves again.
    path.write_bytes(model_file.read_bytes())
    assert file_sha256(path) == file_sha256(model_file)
    manager = ModelManager(cfg)
    try:
        assert manager.load(retry=True).version == "v-a"
    finally:
        manager.close()


def test_a_promoted_version_whose_file_was_replaced_leaves_production_serving(
    manager: ModelManager,
    settings: Settings,
    model_file: Path,
    other_weights: Path,
    tmp_path: Path,
) -> None:
    from segsvc.ml.convert import ModelFileMismatchError

    manager.load()
    path = tmp_path / "next.keras"
    path.write_bytes(model_file.read_bytes())
    register(settings, path, "next")
    set_status(settings, "next", "promote")
    replace_file(path, other_weights)
    with pytest.raises(ModelFileMismatchError, match="replaced at its path"):
        manager.refresh()
    assert manager.model_for(uuid.uuid4()).version == "test-v1"  # still serving


def test_a_canary_whose_file_was_replaced_is_not_routed_to_and_then_rejected(
    manager: ModelManager,
    settings: Settings,
    model_file: Path,
    other_weights: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manager.load()
    path = tmp_path / "cand.keras"
    path.write_bytes(model_file.read_bytes())
    canary(settings, path, "cand", share=1.0)
    replace_file(path, other_weights)
    manager.refresh()
    assert manager.routing.canary is None
    assert manager.model_for(uuid.uuid4()).version == "test-v1"
    monkeypatch.setattr(model_manager, "BROKEN_RETRY_S", 0.0)
    manager.refresh()
    status, reason = canary_row(settings, "cand")
    assert status == "rejected"
    assert "sha256" in reason
