"""Print the configuration table (every `SEG_*` setting, its default and meaning) as Markdown.

Generated from the `Settings` model's fields, so the README stays true:
    .venv/bin/python scripts/settings_table.py                    # print it
    .venv/bin/python scripts/settings_table.py --write README.md  # replace it between the markers
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic_core import PydanticUndefined

from segsvc.settings import ROOT, Settings

START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def show_default(value: Any) -> str:
    """A default as a reader would type it (paths relative to the checkout)."""
    if value is None or value is PydanticUndefined:
        return "(unset)"
    if isinstance(value, Path):
        try:
            return f"`{value.relative_to(ROOT)}`"
        except ValueError:
            return f"`{value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def settings_table() -> str:
    """One Markdown row per setting, in the order the model declares them."""
    prefix = str(Settings.model_config.get("env_prefix", "SEG_"))
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}{name.upper()}` | {show_default(field.default)} | {meaning} |")
    return "\n".join(rows) + "\n"


def embedded_table(text: str) -> str | None:
    """The table between the markers of a Markdown document, None without markers."""
    match = re.search(re.escape(START) + r"\n(.*?)" + re.escape(END), text, re.S)
    return match.group(1) if match else None


def write_table(path: Path) -> None:
    """Replace the table between the markers in `path`."""
    text = path.read_text()
    if embedded_table(text) is None:
        raise SystemExit(f"{path}: add the lines {START} and {END} where the table goes")
    start, end = text.index(START) + len(START) + 1, text.index(END)
    path.write_text(text[:start] + settings_table() + text[end:])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        write_table(Path(sys.argv[2]))
    else:
        sys.stdout.write(settings_table())
