"""segsvc/db.py engines on real Postgres."""

from __future__ import annotations

from segsvc.db import get_engine
from segsvc.settings import Settings


def test_postgres_connections_detect_a_vanished_server(settings: Settings) -> None:
    # Regression: only connect_timeout was set, so a statement on a connection whose server
    # vanished hung for the kernel's ~15 minutes of retransmissions.
    with get_engine(settings).connect() as conn:
        params = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
    assert params["keepalives"] == "1"
    assert int(params["keepalives_idle"]) <= 60
    assert int(params["tcp_user_timeout"]) <= 120_000
