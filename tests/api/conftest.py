"""Fixtures shared by the API tests."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from api.app import create_app
from segsvc.settings import Settings
from tests.segsvc.webhooks.receiver import LOOPBACK_ONLY


@pytest.fixture
def open_client(settings: Settings) -> FlaskClient:
    """An API whose webhooks may target loopback (a test deployment)."""
    app = create_app(settings.model_copy(update={"webhook_allow_networks": LOOPBACK_ONLY}))
    return app.test_client()
