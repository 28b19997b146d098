"""Shared fixtures: real Postgres (one database per xdist worker, migrated once) and real Redis
(one logical DB per xdist worker, flushed per test). Never mocks of either."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from PIL import Image
from sqlalchemy import select, text

from segsvc.db import get_engine, session_scope
from segsvc.migrate import upgrade
from segsvc.models import Base, ModelStatus
from segsvc.services import registry
from segsvc.services.keys import create_key
from segsvc.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _sample_dir() -> Path:
    """The Oxford pets sample: `SEG_TEST_SAMPLE_DIR`, else beside the checkout
    (../shared/data), else where this machine kind keeps it (/work/shared/data), so a clone
    made elsewhere still runs the tests that need real photos instead of skipping them."""
    places = [
        os.environ.get("SEG_TEST_SAMPLE_DIR"),
        ROOT.parent / "shared" / "data" / "oxford_pets_sample",
        "/work/shared/data/oxford_pets_sample",
    ]
    found = [Path(p) for p in places if p and (Path(p) / "images").is_dir()]
    return found[0] if found else ROOT.parent / "shared" / "data" / "oxford_pets_sample"


SAMPLE_DIR = _sample_dir()
PG_ADMIN = os.environ.get("SEG_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SEG_TEST_REDIS", "redis://127.0.0.1:6379")


@pytest.fixture
def skew_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[timedelta], None]:
    """Set this host's clock off by an offset (call it again to change the offset) wherever
    the product reads it: `models.utcnow` and every loaded module's own reference to it
    (segsvc, api, worker, retrain)."""
    from segsvc import models

    true_clock = models.utcnow
    readers = [
        module
        for name, module in list(sys.modules.items())
        if name.split(".")[0] in ("segsvc", "api", "worker", "retrain")
        and getattr(module, "utcnow", None) is true_clock
    ]

    def skew(offset: timedelta) -> None:
        def skewed() -> datetime:
            return datetime.now(UTC) + offset

        for module in readers:
            monkeypatch.setattr(module, "utcnow", skewed)

    return skew


def db_clock(settings: Settings) -> datetime:
    """Now on the database's clock (Postgres' `statement_timestamp()`)."""
    with session_scope(settings) as session:
        now = session.scalar(select(text("statement_timestamp()")))
        assert isinstance(now, datetime)
        return now


def free_port() -> int:
    """A loopback TCP port nothing listens on now (for a server a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def encode_image(img: Image.Image, fmt: str = "PNG", **save_options: object) -> bytes:
    """An image saved in memory as `fmt` (with Pillow's save options), as an upload's bytes."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_options)
    return buf.getvalue()


def sample_images(n: int = 3) -> list[Path]:
    """Real pet photos from the shared sample (skips the test if it is absent)."""
    images = sorted((SAMPLE_DIR / "images").glob("*.jpg"))
    if not images:
        pytest.skip("the Oxford pets sample is not available")
    return images[:: max(1, len(images) // n)][:n]


@contextmanager
def postgres_database(name: str) -> Iterator[str]:
    """An empty Postgres database `name` (made anew), its SQLAlchemy URL; dropped after."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        from segsvc.db import dispose_engines

        dispose_engines()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh, migrated Postgres database of this test process's own (dropped at the end).

    Named after the pid so that concurrent test runs on one machine never share a database.
    """
    with postgres_database(f"segsvc_test_{os.getpid()}") as url:
        upgrade(settings=Settings(database_url=url))
        yield url


@pytest.fixture(scope="session")
def redis_db(request: pytest.FixtureRequest) -> int:
    """A Redis logical database (1-12) for this test process; 13-15 are the benchmarks'
    (`make bench-ab`, `make bench`), which a test's flushes must not empty mid-run.

    xdist workers get 1, 2, ... so they never share one; a plain run picks by pid (Redis has
    only 16 databases, so two concurrent plain runs on one machine can still collide:
    `SEG_TEST_REDIS_DB` pins a plain run to one, for runs side by side).
    """
    pinned = os.environ.get("SEG_TEST_REDIS_DB")
    if pinned:
        return int(pinned)
    worker = getattr(request.config, "workerinput", {}).get("workerid")
    if worker is not None:
        return 1 + int(worker.removeprefix("gw")) % 12
    return 1 + os.getpid() % 12


@pytest.fixture(scope="session")
def session_var_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("var")


@pytest.fixture
def settings(database_url: str, redis_db: int, session_var_dir: Path) -> Iterator[Settings]:
    """Settings on the test Postgres and Redis; tables and Redis emptied after each test."""
    cfg = Settings(
        database_url=database_url,
        broker_url=f"{REDIS_URL}/{redis_db}",
        var_dir=session_var_dir,
        _env_file=None,  # type: ignore[call-arg]
    )
    redis.Redis.from_url(cfg.broker_url or "").flushdb()
    yield cfg
    truncate_all(cfg)
    redis.Redis.from_url(cfg.broker_url or "").flushdb()


def truncate_all(settings: Settings) -> None:
    """Empty every table (tests that start real processes need committed data)."""
    names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with get_engine(settings).begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


@pytest.fixture
def app(settings: Settings):  # type: ignore[no-untyped-def]
    from api.app import create_app

    application = create_app(settings)
    application.config["TESTING"] = True
    return application


@pytest.fixture
def client(app):  # type: ignore[no-untyped-def]
    return app.test_client()


@pytest.fixture
def api_key(settings: Settings) -> str:
    with session_scope(settings) as session:
        _, key = create_key(session=session, name="tester")
    return key


@pytest.fixture
def admin_key(settings: Settings) -> str:
    with session_scope(settings) as session:
        _, key = create_key(session=session, name="admin", is_admin=True)
    return key


@pytest.fixture
def auth(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


@pytest.fixture(scope="session")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly initialised U-Net saved once per session (real architecture, random weights)."""
    from segsvc.ml.unet import build_unet

    path = tmp_path_factory.mktemp("models") / "test-unet.keras"
    build_unet().save(path)
    return path


@pytest.fixture
def production_model(settings: Settings, model_file: Path) -> str:
    """`model_file` registered as the production version."""
    with session_scope(settings) as session:
        row = registry.register_version(
            session=session, version="test-v1", path=model_file, status=ModelStatus.PRODUCTION
        )
        return row.version


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a real worker/API subprocess on the test databases."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEG_")}
    env.update(
        SEG_DATABASE_URL=settings.database_url or "",
        SEG_BROKER_URL=settings.broker_url or "",
        SEG_VAR_DIR=str(settings.var_dir),
        PYTHONUNBUFFERED="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        **extra,
    )
    return env


def start_celery(
    settings: Settings,
    log_path: Path,
    *,
    app: str = "worker.celery_app",
    queue: str | None = None,
    pool: tuple[str, ...] = ("--pool", "solo"),
    timeout: float = 120,
    **extra: str,
) -> subprocess.Popen[bytes]:
    """Start a real Celery worker process on the test databases and wait until it is ready."""
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-Q",
        queue or settings.queue_name,
        *pool,
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "INFO",
        "--hostname",
        f"test-{os.getpid()}-{time.monotonic_ns()}@%h",
    ]
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=worker_env(settings, **extra), stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{app} worker exited early:\n{log_path.read_text()[-3000:]}")
        if b" ready." in log_path.read_bytes():
            return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{app} worker not ready in time:\n{log_path.read_text()[-3000:]}")


def start_worker(settings: Settings, log_path: Path, **extra: str) -> subprocess.Popen[bytes]:
    """Start a real Celery inference worker and wait until it is ready."""
    return start_celery(settings, log_path, **extra)


def wait_http_up(
    base: str, proc: subprocess.Popen[bytes], log_path: Path, path: str = "/healthz"
) -> None:
    """Wait until a server process answers `GET path` (its log's tail if it exits)."""
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log_path.read_text()[-3000:])
        try:
            if httpx.get(f"{base}{path}", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("the server did not start")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a child process and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def worker(settings: Settings, production_model: str, tmp_path: Path) -> Iterator[Path]:
    """A real inference worker process; yields its log path."""
    log_path = tmp_path / "worker.log"
    proc = start_worker(settings, log_path)
    yield log_path
    stop_process(proc)
