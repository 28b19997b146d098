"""The fault tests' own Postgres: found whatever version the machine installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault.harness import postgres_bin


def test_the_newest_installed_postgres_is_used(tmp_path: Path) -> None:
    """It was /usr/lib/postgresql/15 whatever was installed: on Debian 13 (17) every fault
    test failed to find initdb."""
    for version, programs in (("15", True), ("17", True), ("18", False), ("9.6", True)):
        folder = tmp_path / version / "bin"
        folder.mkdir(parents=True)
        if programs:
            (folder / "initdb").touch()
    assert postgres_bin(tmp_path) == tmp_path / "17" / "bin"
    with pytest.raises(FileNotFoundError):
        postgres_bin(tmp_path / "none")
