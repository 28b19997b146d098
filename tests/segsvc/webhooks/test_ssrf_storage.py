"""The webhook URL limit against the table that stores it: a URL the validator accepts fits
webhook_endpoints' URL indexes (Postgres refuses an index entry over ~2.7 kB)."""

from __future__ import annotations

import random

from sqlalchemy import select

from segsvc.db import session_scope
from segsvc.models import WebhookEndpoint
from segsvc.services.keys import create_key
from segsvc.settings import Settings
from segsvc.webhooks.ssrf import MAX_URL_LENGTH, check_url


def test_an_endpoint_row_stores_a_url_of_the_longest_accepted_size(settings: Settings) -> None:
    # Random characters: a repeated one would compress, and fit an index entry of any size.
    rng = random.Random(7)
    base = "https://hooks.example/"
    chars = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(600))
    url = (
        base
        + chars
        + "".join(
            rng.choice("abcdefghijklmnopqrstuvwxyz0123456789")
            for _ in range(MAX_URL_LENGTH - len(base) - 1800)
        )
    )
    assert len(url.encode()) == MAX_URL_LENGTH
    check_url(url, resolver=lambda _host, _port: ["93.184.215.14"])  # validator only, no request
    with session_scope(settings) as session:
        key, _ = create_key(session=session, name="long-url")
        session.add(WebhookEndpoint(client_id=key.id, url=url))
    with session_scope(settings) as session:
        stored = session.scalars(select(WebhookEndpoint.url)).one()
    assert stored == url
