"""segsvc/services/idempotency.py: two requests with one key that both missed the replay."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from segsvc.db import session_scope
from segsvc.errors import ConflictError, ValidationError
from segsvc.images import validate_image
from segsvc.migrate import upgrade
from segsvc.models import Job
from segsvc.services import idempotency
from segsvc.services.jobs import create_jobs
from segsvc.services.keys import create_key
from segsvc.settings import Settings
from tests.segsvc.test_feedback import photo_bytes


@pytest.fixture(params=["postgresql", "sqlite"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The test Postgres, or the embedded SQLite `make run` uses when no database is set."""
    if request.param == "postgresql":
        cfg: Settings = request.getfixturevalue("settings")
        return cfg
    cfg = Settings(var_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    upgrade(settings=cfg)
    return cfg


@pytest.mark.parametrize("anonymous", [False, True])
def test_the_loser_of_a_keyed_insert_race_gets_409_and_one_job_exists(
    any_db: Settings, anonymous: bool
) -> None:
    # Regressions: on SQLite the loser's unique-index violation was not caught (a 500); with
    # auth off (no client) the unique index let both in, as it counts NULLs as distinct, and
    # every retry then got 422.
    image = validate_image(photo_bytes(), max_bytes=10**7, max_pixels=10**8)
    req = idempotency.parse_request("order-7", image_sha256=image.sha256, fields=[])
    assert req is not None
    with session_scope(any_db) as session:
        client_id = None if anonymous else create_key(session=session, name="racer")[0].id

    def insert(session: Session) -> None:
        with idempotency.race_guard(session=session, req=req):
            create_jobs(
                session=session,
                images=[image],
                client_id=client_id,
                idempotency_keys=[req.key],
                request_fingerprint=req.fingerprint,
            )

    with session_scope(any_db) as session:
        insert(session)  # the winner
    with (
        session_scope(any_db) as session,
        pytest.raises(ConflictError, match="being processed") as lost,
    ):
        insert(session)  # its twin, past the replay lookup before the winner committed
    # A code clients retry on (with the same key: the retry replays the winner's job).
    assert (lost.value.code, lost.value.retry_after) == ("idempotency_key_in_use", 1)
    with session_scope(any_db) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1


@pytest.mark.parametrize("raw_key", ["k1, k2", "k1,k2", "k1,k1", ",", "order,7"])
def test_a_key_with_a_comma_is_refused_as_a_repeated_header(raw_key: str) -> None:
    """A repeated Idempotency-Key header arrives folded into one value joined by commas, which
    nothing tells from a key with a comma: neither is taken (it was, as a new key)."""
    with pytest.raises(ValidationError, match="sent more than once, or contains a comma"):
        idempotency.parse_request(raw_key, image_sha256="0" * 64, fields=[])


def test_a_key_of_other_printable_ascii_is_taken() -> None:
    req = idempotency.parse_request(" order;7:a=b ", image_sha256="0" * 64, fields=[])
    assert req is not None
    assert req.key == "order;7:a=b"
