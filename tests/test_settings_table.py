"""scripts/settings_table.py: the README's configuration table comes from the Settings model."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from segsvc.settings import Settings
from tests.conftest import ROOT


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "settings_table", ROOT / "scripts" / "settings_table.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_table_lists_every_setting_with_meaning() -> None:
    table = load_script().settings_table()
    for name, field in Settings.model_fields.items():
        assert f"`SEG_{name.upper()}`" in table
        assert field.description, f"{name} needs a description for the README"
    assert len(table.splitlines()) == 2 + len(Settings.model_fields)


def test_settings_table_write_replaces_between_markers(tmp_path: Path) -> None:
    script = load_script()
    doc = tmp_path / "README.md"
    doc.write_text(f"# x\n{script.START}\nold\n{script.END}\nrest\n")
    script.write_table(doc)
    assert script.embedded_table(doc.read_text()) == script.settings_table()
    assert doc.read_text().endswith(f"{script.END}\nrest\n")


def test_readme_settings_table_is_current() -> None:
    script = load_script()
    embedded = script.embedded_table((ROOT / "README.md").read_text())
    if embedded is None:
        pytest.skip("README.md has no settings-table markers yet")
    assert embedded == script.settings_table(), (
        "README.md's configuration table is stale: run "
        "`.venv/bin/python scripts/settings_table.py --write README.md`"
    )
