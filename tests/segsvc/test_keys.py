from __future__ import annotations

import pytest
from sqlalchemy import update

from segsvc.db import session_scope
from segsvc.errors import ConflictError, NotFoundError, UnauthorizedError
from segsvc.models import ApiKey, utcnow
from segsvc.services import keys
from segsvc.settings import Settings


def test_create_key_stores_only_its_hash(settings: Settings) -> None:
    with session_scope(settings) as session:
        row, plaintext = keys.create_key(session=session, name="n")
        assert row.key_hash == keys.hash_key(plaintext)
        assert plaintext not in (row.key_hash, row.prefix)


def test_authenticate_cached_remembers_until_ttl(settings: Settings) -> None:
    keys._auth_cache.clear()
    with session_scope(settings) as session:
        _, key = keys.create_key(session=session, name="n")
        first = keys.authenticate_cached(session=session, key=key)
        session.execute(update(ApiKey).values(revoked_at=utcnow()))
        assert keys.authenticate_cached(session=session, key=key) == first  # within the TTL
        keys._auth_cache.clear()  # what AUTH_CACHE_SECONDS passing does
        with pytest.raises(UnauthorizedError):
            keys.authenticate_cached(session=session, key=key)


def test_authenticate_cached_does_not_remember_failures(settings: Settings) -> None:
    keys._auth_cache.clear()
    with session_scope(settings) as session, pytest.raises(UnauthorizedError):
        keys.authenticate_cached(session=session, key="seg_unknown")
    assert keys._auth_cache == {}


def test_revoke_key_by_prefix_or_id_ends_its_use(settings: Settings) -> None:
    keys._auth_cache.clear()
    with session_scope(settings) as session:
        first, first_key = keys.create_key(session=session, name="first")
        second, second_key = keys.create_key(session=session, name="second")
        keys.revoke_key(session=session, ref=f"{first.prefix}...")  # as `keys list` shows it
        keys.revoke_key(session=session, ref=str(second.id))
    with session_scope(settings) as session:
        for key in (first_key, second_key):
            with pytest.raises(UnauthorizedError):
                keys.authenticate(session=session, key=key)
        listed = {row.name: row.revoked_at for row in keys.list_keys(session=session)}
    assert listed["first"] is not None
    assert listed["second"] is not None


def test_revoking_a_revoked_key_keeps_when_it_was_revoked(settings: Settings) -> None:
    with session_scope(settings) as session:
        row, _ = keys.create_key(session=session, name="n")
        when = keys.revoke_key(session=session, ref=str(row.id)).revoked_at
    with session_scope(settings) as session:
        assert keys.revoke_key(session=session, ref=str(row.id)).revoked_at == when


def test_revoke_refuses_a_shared_prefix_and_an_unknown_one(settings: Settings) -> None:
    with session_scope(settings) as session:
        one, _ = keys.create_key(session=session, name="one")
        two, _ = keys.create_key(session=session, name="two")
        two.prefix = one.prefix  # 36 random bits each: rare, but a guess would be worse
    with session_scope(settings) as session, pytest.raises(ConflictError, match="by its id"):
        keys.revoke_key(session=session, ref=one.prefix)
    with session_scope(settings) as session, pytest.raises(NotFoundError):
        keys.revoke_key(session=session, ref="seg_nosuch")
    with session_scope(settings) as session:
        assert all(row.revoked_at is None for row in keys.list_keys(session=session))


def test_cli_keys_list_and_revoke(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from segsvc.cli import main

    monkeypatch.setattr("segsvc.cli.get_settings", lambda: settings)
    created = CliRunner().invoke(main, ["keys", "create", "--name", "ci bot"])
    assert created.exit_code == 0, created.output
    key = created.output.splitlines()[-1]
    listed = CliRunner().invoke(main, ["keys", "list"])
    assert listed.exit_code == 0, listed.output
    (line,) = [row for row in listed.output.splitlines() if "\tci bot\t" in row]
    key_id, prefix, _, admin, _, revoked = line.split("\t")
    assert (prefix, admin, revoked) == (f"{key[:10]}...", "-", "-")

    revoked_now = CliRunner().invoke(main, ["keys", "revoke", prefix])
    assert revoked_now.exit_code == 0, revoked_now.output
    assert "revoked at" in revoked_now.output
    assert "within 30 s" in revoked_now.output
    with session_scope(settings) as session, pytest.raises(UnauthorizedError):
        keys.authenticate(session=session, key=key)
    listed = CliRunner().invoke(main, ["keys", "list"])
    (line,) = [row for row in listed.output.splitlines() if row.startswith(f"{key_id}\t")]
    assert line.split("\t")[-1] != "-"  # its revocation time

    unknown = CliRunner().invoke(main, ["keys", "revoke", "seg_nosuch"])
    assert unknown.exit_code == 1
    assert "No API key has the id or prefix 'seg_nosuch'" in unknown.output
    assert "Traceback" not in unknown.output


@pytest.mark.parametrize(
    "args",
    [["keys", "list"], ["keys", "revoke", "seg_x"], ["models", "list"], ["models", "rollback"]],
)
def test_cli_with_the_database_down_says_so_in_one_line(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """An operator command with the database down (or refusing) was a traceback of fifty
    frames; it is one line and exit 1."""
    from click.testing import CliRunner

    from segsvc.cli import main
    from tests.conftest import free_port

    down = settings.model_copy(
        update={"database_url": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"}
    )
    monkeypatch.setattr("segsvc.cli.get_settings", lambda: down)
    monkeypatch.setattr("segsvc.db.get_settings", lambda: down, raising=False)
    monkeypatch.setattr("segsvc.settings.get_settings", lambda: down)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "Error: the database refused or could not be reached" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert isinstance(result.exception, SystemExit)  # click's exit, not an exception


def test_cli_a_name_the_database_refuses_is_one_line(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from segsvc.cli import main

    monkeypatch.setattr("segsvc.cli.get_settings", lambda: settings)
    result = CliRunner().invoke(main, ["keys", "create", "--name", "x" * 201])
    assert result.exit_code == 1, result.output
    assert "the database refused" in result.output
    assert "Traceback" not in result.output
