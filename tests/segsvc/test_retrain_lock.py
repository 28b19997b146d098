"""segsvc/retrain_lock.py on the embedded SQLite default: a file lock in var_dir (the Postgres
advisory lock is tested with the pipeline, tests/retrain/test_pipeline.py)."""

from __future__ import annotations

from pathlib import Path

from segsvc.retrain_lock import retrain_lock
from segsvc.settings import Settings


def test_retrain_lock_on_sqlite_is_one_file_lock_in_var_dir(tmp_path: Path) -> None:
    cfg = Settings(var_dir=tmp_path / "var", _env_file=None)  # type: ignore[call-arg]
    with retrain_lock(cfg) as first:
        assert first
        assert (cfg.var_dir / "retrain.lock").is_file()
        with retrain_lock(cfg) as second:
            assert not second
    with retrain_lock(cfg) as again:
        assert again
