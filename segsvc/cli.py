"""The `segsvc` command: operations (db, models, keys), the dev runner, training and client.

Commands of the entry-point packages (`retrain`, the client) load lazily, so `segsvc db upgrade`
never imports TensorFlow.
"""

from __future__ import annotations

import importlib
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import click

from segsvc.settings import get_settings


def outage_message(exc: BaseException) -> str | None:
    """One line for an error of a server the command needs (the database refused or is not
    there, the broker is not there); None for any other error. Checked by module, so that
    naming them imports nothing the command did not."""
    sa = sys.modules.get("sqlalchemy.exc")
    if sa is not None and isinstance(exc, sa.DBAPIError):
        detail = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else repr(exc.orig)
        return f"the database refused or could not be reached: {detail}"
    kombu = sys.modules.get("kombu.exceptions")
    redis = sys.modules.get("redis.exceptions")
    if (kombu is not None and isinstance(exc, kombu.OperationalError)) or (
        redis is not None and isinstance(exc, redis.ConnectionError)
    ):
        return f"the broker could not be reached: {exc}"
    return None


class LazyGroup(click.Group):
    """A click group whose some commands are imported only when used."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module, attr = self.lazy[cmd_name].split(":")
            command: click.Command = getattr(importlib.import_module(module), attr)
            return command
        return super().get_command(ctx, cmd_name)


class OperatorGroup(LazyGroup):
    """The top-level group: a database or broker that refuses or is not there is one line
    and exit 1, not a traceback of fifty frames (`segsvc keys revoke` with the database down)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = outage_message(exc)
            if message is None:
                raise
            raise click.ClickException(message) from None


@click.group(
    cls=OperatorGroup,
    lazy={
        "train": "retrain.cli:train",
        "evaluate": "retrain.cli:evaluate",
        "run": "segsvc.devserver:run",
        "reconcile": "worker.reconciler:reconcile_command",
        # HTTP client (segsvc/client_cli.py); the four job verbs are also top-level shortcuts.
        "client": "segsvc.client_cli:client",
        "submit": "segsvc.client_cli:submit",
        "status": "segsvc.client_cli:status",
        "get": "segsvc.client_cli:get",
        "cancel": "segsvc.client_cli:cancel",
    },
)
def main() -> None:
    """segsvc: image segmentation as a service."""


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.option(
    "--init-models",
    is_flag=True,
    help="Then register the shipped model as production if none is (`segsvc models init`).",
)
@click.option(
    "--sql",
    "as_sql",
    is_flag=True,
    help="Print the steps' SQL script instead of running them (Postgres; connects to nothing), "
    "for review or to apply with psql.",
)
@click.option(
    "--from",
    "from_revision",
    default=None,
    metavar="REVISION",
    help="With --sql: the revision the database is at (default: an empty database).",
)
def db_upgrade(revision: str, init_models: bool, as_sql: bool, from_revision: str | None) -> None:
    """Apply Alembic migrations up to REVISION (never back: Alembic's upgrade to an older
    revision does nothing, which is said, not reported as done). With --sql, print them as a
    SQL script instead."""
    from alembic.util import CommandError

    from segsvc.migrate import MigrationLockError, current_revisions, sql_script, upgrade
    from segsvc.schema import code_revisions

    if from_revision is not None and not as_sql:
        raise click.UsageError("--from goes with --sql (a live upgrade reads where it is)")
    if as_sql:
        if init_models:
            raise click.UsageError("--init-models writes to the database; --sql writes a script")
        try:
            sql_script(out=sys.stdout, revision=revision, from_revision=from_revision)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
        except CommandError as exc:
            raise click.ClickException(f"no script: {exc}") from None
        return
    _exit_on_sigterm()
    try:
        upgrade(revision=revision)
    except MigrationLockError as exc:
        raise click.ClickException(f"migration stopped: {exc}") from exc
    except CommandError as exc:  # an unknown revision, say: Alembic's message is the answer
        raise click.ClickException(f"migration refused: {exc}") from None
    at = ", ".join(current_revisions()) or "no revision"
    where = get_settings().sqlalchemy_url.split("@")[-1]
    if revision in code_revisions()[0] and at != revision:
        raise click.ClickException(
            f"database at {at}, not {revision}: {where} (an upgrade never goes back; a "
            "downgrade is `alembic downgrade REVISION`, with the releases before it stopped)"
        )
    click.echo(f"database at {at}: {where}")
    if init_models:
        models_init.callback()  # type: ignore[misc]


def _exit_on_sigterm() -> None:
    """Make SIGTERM (a Job's deadline, `docker stop`) end the run like Ctrl-C: psycopg then
    cancels the statement in flight on the server. Killed outright, the process left it running
    there, an ALTER TABLE still queued for its lock (holding up every request behind it) and the
    migration lock held, until Postgres noticed the connection was gone. As a container's PID 1
    a process has no default action for SIGTERM at all."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(f"stopped by {signal.Signals(signum).name}: its statement was cancelled")

    signal.signal(signal.SIGTERM, stop)


@main.group(cls=LazyGroup, lazy={"check-runtimes": "retrain.cli:check_runtimes"})
def models() -> None:
    """Model versions."""


@models.command("init")
def models_init() -> None:
    """Register the shipped model (or a fresh one) as production if none is."""
    from segsvc.services.bootstrap import ensure_production_model

    version, created = ensure_production_model()
    click.echo(f"{'registered' if created else 'production is'} {version}")


@models.command("list")
def models_list() -> None:
    """List registered versions."""
    from segsvc.db import session_scope
    from segsvc.services.registry import list_versions

    with session_scope() as session:
        for row in list_versions(session=session):
            miou = row.metrics.get("mean_iou")
            gone = " (file deleted)" if row.file_deleted_at is not None else ""
            click.echo(
                f"{row.version:<28} {row.status:<11} share={row.traffic_share:.2f} "
                f"miou={_round4(miou)}{_measured_on(row.metrics)} "
                f"{Path(row.path).name}{gone}"
            )


def _round4(value: object) -> str:
    """An mIoU as the model card and the API's clients show it: 4 decimals, `-` for none."""
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def _measured_on(metrics: dict[str, Any]) -> str:
    """On what images a version's mIoU was measured, and what it was compared with there: the
    shipped model's on its training data's validation split, a retrained one's on the
    evaluation folder beside production's. mIoUs on different images do not compare."""
    images = metrics.get("images")
    count = f", {images} images" if isinstance(images, int) else ""
    lineage = metrics.get("lineage_best")
    against = metrics.get("evaluated_against")
    if isinstance(lineage, dict) and isinstance(lineage.get("eval_set"), str):
        parts = []
        if isinstance(against, dict) and against.get("mean_iou") is not None:
            parts.append(f"vs {_round4(against['mean_iou'])} of {against.get('version')}")
        parts.append(f"evaluation set {lineage['eval_set'][:8]}{count}")
        return f" ({', '.join(parts)})"
    if isinstance(metrics.get("split"), str):
        return f" ({metrics['split']} split of its training data{count})"
    return ""


@models.command("promote")
@click.argument("version")
@click.option(
    "--force", is_flag=True, help="Promote a version a worker rejected for failing to load it."
)
def models_promote(version: str, force: bool) -> None:
    """Make VERSION production now (the old one is archived; workers switch within seconds)."""
    from segsvc.db import session_scope
    from segsvc.errors import SegError
    from segsvc.services.rollout import promote

    try:
        with session_scope() as session:
            row = promote(
                session=session,
                version=version,
                reason="promoted by an operator (cli)",
                force=force,
            )
            done = f"production is {row.version} (previous: {row.parent_version or '-'})"
    except SegError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(done)  # once committed


@models.command("reject")
@click.argument("version")
def models_reject(version: str) -> None:
    """Reject VERSION now: a canary stops serving (workers drop it within a poll), production
    untouched (a rollback would retire it too). Production itself is refused."""
    from segsvc.db import session_scope
    from segsvc.errors import SegError
    from segsvc.services.rollout import reject_by_operator

    try:
        with session_scope() as session:
            row = reject_by_operator(
                session=session, version=version, reason="rejected by an operator (cli)"
            )
            done = f"rejected {row.version}"
    except SegError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(done)  # once committed


@models.command("rollback")
def models_rollback() -> None:
    """Return to the previous production version now; the current one and any canary stop."""
    from segsvc.db import session_scope
    from segsvc.errors import SegError
    from segsvc.services.rollout import rollback

    try:
        with session_scope() as session:
            row = rollback(session=session, reason="rolled back by an operator (cli)")
            done = f"production is {row.version} again"
    except SegError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(done)  # once committed


@models.command("prune-artifacts")
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
@click.option(
    "--grace-hours",
    type=click.FloatRange(min=1),
    default=None,
    help="Keep what was used more recently than this [default: SEG_ARTIFACT_GRACE_HOURS].",
)
def models_prune_artifacts(dry_run: bool, grace_hours: float | None) -> None:
    """Delete converted artifacts that no version the registry may serve needs (workers
    also do this every 10 minutes): other versions', older converter fingerprints',
    old broken files. A folder a worker converts into is skipped."""
    from segsvc.services.artifacts import prune_artifact_cache

    cfg = get_settings()
    older_than_s = None if grace_hours is None else grace_hours * 3600
    result = prune_artifact_cache(cfg, dry_run=dry_run, older_than_s=older_than_s)
    if result.skipped:
        raise click.ClickException("another prune of the artifact cache is running")
    verb = "would delete" if dry_run else "deleted"
    for path in result.removed:
        click.echo(f"{verb} {path}")
    for path in result.busy:
        click.echo(f"skipped {path}: a worker is converting into it")
    click.echo(
        f"{verb} {len(result.removed)} ({result.freed_bytes / 1e6:.1f} MB) in {cfg.artifact_dir}"
    )


@models.command("prune-files")
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
@click.option(
    "--grace-days",
    type=click.FloatRange(min=0),
    default=None,
    help="Keep files (and rejections) more recent than this [default: SEG_MODEL_FILE_GRACE_DAYS].",
)
def models_prune_files(dry_run: bool, grace_days: float | None) -> None:
    """Delete model files retraining wrote to SEG_VAR_DIR/models that can never serve (each
    retraining run also does this at its end): rejected versions', archived versions' past
    the rollback targets (SEG_MODEL_KEEP_ARCHIVED and production's parent stay; their rows
    stay, marked) and those no version names (of crashed runs). Production, canary and
    candidate versions' files always stay."""
    from segsvc.services.model_files import models_dir, prune_model_files

    cfg = get_settings()
    older_than_s = None if grace_days is None else grace_days * 86400
    result = prune_model_files(cfg, dry_run=dry_run, older_than_s=older_than_s)
    if result.skipped:
        raise click.ClickException("another prune of the model files is running")
    verb = "would delete" if dry_run else "deleted"
    for path in result.removed:
        click.echo(f"{verb} {path}")
    if result.orphans_skipped:
        click.echo("kept files no version names: a retraining run is going on")
    archived = len(result.archived)
    click.echo(
        f"{verb} {len(result.removed)} files ({result.freed_bytes / 1e6:.1f} MB) of "
        f"{len(result.versions) - archived} rejected versions, {archived} archived versions "
        f"past the rollback targets and crashed runs in {models_dir(cfg)}"
    )


@main.group("retrain")
def retrain_group() -> None:
    """Retraining from user feedback."""


@retrain_group.command("now")
@click.option(
    "--queue",
    "via_queue",
    is_flag=True,
    help="Send the run to the maintenance worker instead of running it here.",
)
def retrain_now(via_queue: bool) -> None:
    """Run retraining once now (snapshot labels, fine-tune, evaluate, gate, register). Unlike
    a scheduled run it does not wait for a canary's verdict: its eligible candidate supersedes
    the canary."""
    if via_queue:
        from retrain.tasks import MAINTENANCE_QUEUE
        from segsvc.queue import RETRAIN, make_celery

        sent = make_celery().send_task(
            RETRAIN, kwargs={"trigger": "manual"}, queue=MAINTENANCE_QUEUE
        )
        click.echo(
            f"sent to the {MAINTENANCE_QUEUE} queue (task {sent.id}); follow it with "
            "`segsvc retrain log --follow` once the maintenance worker starts it"
        )
        return
    import logging

    from retrain.pipeline import RetrainBusyError, run_retraining

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        result = run_retraining(trigger="manual")
    except RetrainBusyError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(f"run {result.run_id}: {result.status}: {result.reason}")
    if result.status == "failed":
        raise SystemExit(1)


@retrain_group.command("runs")
@click.option("--limit", default=10, show_default=True, type=click.IntRange(min=1))
def retrain_runs(limit: int) -> None:
    """List the latest retraining runs, newest first: a running one with its latest log line."""
    from segsvc.db import session_scope
    from segsvc.services.registry import (
        INTERRUPTED,
        INTERRUPTED_REASON,
        interrupted_runs,
        recent_training_runs,
    )

    with session_scope() as session:
        runs = recent_training_runs(session=session, limit=limit)
        if not runs:
            click.echo(
                "no retraining run yet (beat runs one on SEG_RETRAIN_CRON; `segsvc retrain "
                "now` runs one now)"
            )
        # A `running` row whose process died (nothing holds the retraining lock) is shown so.
        gone = interrupted_runs(
            session=session,
            settings=get_settings(),
            running=[r.id for r in runs if r.status == "running"],
        )
        for run in runs:
            took = f"{run.duration_s:.0f}s" if run.duration_s is not None else "-"
            lines = (run.log or "").splitlines()
            status, said = run.status, run.reason
            if run.id in gone:
                status, said = INTERRUPTED, INTERRUPTED_REASON
            elif run.status == "running":
                said = lines[-1] if lines else ""
            labels = (run.data_counts or {}).get("labels", 0)
            click.echo(
                f"{run.id} {status:<9} {run.trigger:<8} {run.started_at:%Y-%m-%d %H:%M} "
                f"{took:>6} labels={labels} {said or ''}".rstrip()
            )


@retrain_group.command("log")
@click.argument("run_id", required=False)
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the run ends.")
def retrain_log(run_id: str | None, follow: bool) -> None:
    """Print a retraining run's log (the latest run's without RUN_ID); a running run's log is
    stored every few seconds, and --follow prints each new part until the run ends. A run
    whose process died (no process holds the retraining lock) shows as interrupted: --follow
    stops there, exit status 1."""
    import time

    from sqlalchemy import select

    from segsvc.db import session_scope
    from segsvc.models import TrainingRun
    from segsvc.services.registry import INTERRUPTED, INTERRUPTED_REASON, interrupted_runs

    if run_id is not None:
        try:
            wanted = uuid.UUID(run_id)
        except ValueError:  # the start of one, as `retrain runs` shows them
            wanted = _run_by_prefix(run_id)
    else:  # the latest, chosen once: a run started later is not followed
        latest = _latest_run_ids(1)
        if not latest:
            raise click.ClickException("no retraining run yet")
        wanted = latest[0]
    printed = ""
    while True:
        with session_scope() as session:
            row = session.execute(
                select(
                    TrainingRun.id, TrainingRun.status, TrainingRun.reason, TrainingRun.log
                ).where(TrainingRun.id == wanted)
            ).first()
            # Its process died (an OOM-killed maintenance worker): the row would say running
            # until the next run, and --follow looped for ever.
            gone = row is not None and bool(
                interrupted_runs(
                    session=session,
                    settings=get_settings(),
                    running=[row.id] if row.status == "running" else [],
                )
            )
        if row is None:
            raise click.ClickException(f"no retraining run {wanted}")
        text = row.log or ""
        click.echo(_after(printed, text), nl=False)
        printed = text
        if gone:
            click.echo(f"run {row.id}: {INTERRUPTED}: {INTERRUPTED_REASON}")
            if follow:
                raise SystemExit(1)
            return
        if not follow or row.status != "running":
            break
        time.sleep(2.0)
    click.echo(f"run {row.id}: {row.status}" + (f": {row.reason}" if row.reason else ""))


RUN_PREFIX_SCAN = 1000  # the latest runs a prefix is looked for among


def _latest_run_ids(limit: int) -> list[uuid.UUID]:
    """The ids of the `limit` latest retraining runs, newest first."""
    from sqlalchemy import select

    from segsvc.db import session_scope
    from segsvc.models import TrainingRun

    with session_scope() as session:
        query = select(TrainingRun.id).order_by(TrainingRun.started_at.desc()).limit(limit)
        return list(session.scalars(query))


def _run_by_prefix(prefix: str) -> uuid.UUID:
    """The run whose id starts with `prefix` (at least 4 characters), among the latest ones."""
    if len(prefix) < 4 or not set(prefix.lower()) <= set("0123456789abcdef-"):
        raise click.BadParameter(
            f"not a run id or its start (4 characters at least): {prefix!r}", param_hint="RUN_ID"
        )
    ids = _latest_run_ids(RUN_PREFIX_SCAN)
    found = [run for run in ids if str(run).startswith(prefix.lower())]
    if len(found) != 1:
        raise click.ClickException(
            f"{'no' if not found else len(found)} retraining runs start with {prefix!r}"
            + ("" if not found else ": give more of the id")
        )
    return found[0]


def _after(printed: str, text: str) -> str:
    """What `text`, the stored log now, holds beyond `printed`, the stored log before: the
    stored log is its last 64 KB (`retrain.pipeline.LOG_CAP`), so once it is full its head
    goes as its tail grows, and what is new follows the end of what was printed."""
    if text.startswith(printed):
        return text[len(printed) :]
    tail = printed[-256:]
    at = text.rfind(tail)
    return text[at + len(tail) :] if at >= 0 else text


@main.group()
def keys() -> None:
    """API keys."""


@keys.command("create")
@click.option("--name", required=True)
@click.option("--admin", is_flag=True, help="Allow admin-only operations.")
def keys_create(name: str, admin: bool) -> None:
    """Create a key; it is printed once, alone on the last line."""
    from segsvc.db import session_scope
    from segsvc.services.keys import create_key

    with session_scope(get_settings()) as session:
        row, plaintext = create_key(session=session, name=name, is_admin=admin)
        click.echo(f"created key {row.prefix}... for {name!r} (admin={admin}); store it now:")
    click.echo(plaintext)


@keys.command("list")
def keys_list() -> None:
    """Every key, tab-separated: id, prefix, name, admin, created, revoked (or -)."""
    from segsvc.db import session_scope
    from segsvc.services.keys import list_keys

    with session_scope(get_settings()) as session:
        for row in list_keys(session=session):
            revoked = row.revoked_at.isoformat() if row.revoked_at else "-"
            fields = [str(row.id), f"{row.prefix}...", row.name, "admin" if row.is_admin else "-"]
            click.echo("\t".join([*fields, row.created_at.isoformat(), revoked]))


@keys.command("revoke")
@click.argument("ref")
def keys_revoke(ref: str) -> None:
    """Revoke the key whose id or prefix (as `keys list` shows it) is REF.

    Requests with it get 401 once each API process's key cache (30 s) has let it go."""
    from segsvc.db import session_scope
    from segsvc.errors import SegError
    from segsvc.services.keys import AUTH_CACHE_SECONDS, revoke_key

    try:
        with session_scope(get_settings()) as session:
            row = revoke_key(session=session, ref=ref)
            when = row.revoked_at.isoformat() if row.revoked_at else "?"
            done = (
                f"key {row.prefix}... ({row.name!r}) revoked at {when}; API processes refuse it "
                f"within {AUTH_CACHE_SECONDS:g} s"
            )
    except SegError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(done)  # once committed: a revocation whose commit failed is not reported done


@main.group()
def blobs() -> None:
    """Blob files (SEG_BLOB_STORE=fs)."""


@blobs.command("sweep")
@click.option(
    "--grace-hours",
    type=click.FloatRange(min=1),
    default=24.0,
    show_default=True,
    help="Keep files written or reused more recently than this (uploads in flight; 1 at least: "
    "an upload's file is written before its row commits).",
)
def blobs_sweep(grace_hours: float) -> None:
    """Delete every blob file no job refers to: a full pass over the folder and the jobs table
    for orphans retention does not know of (an upload whose row never committed, temporary
    files of crashed writes). Retention deletes purged inputs' files by itself, hourly."""
    from retrain.tasks import sweep_unnamed_blobs  # the daily beat task's own pass
    from segsvc.errors import SegError

    try:
        removed = sweep_unnamed_blobs(get_settings(), older_than_s=grace_hours * 3600)
    except SegError as exc:  # the volume away, or a folder not the store: nothing deleted
        raise click.ClickException(f"{exc.message} Nothing was deleted.") from None
    click.echo(f"deleted {removed} blob file{'s' * (removed != 1)} no job refers to")


@blobs.command("adopt")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def blobs_adopt(yes: bool) -> None:
    """Make the folder now at SEG_BLOB_DIR the database's blob store: after moving the files to
    a volume without its .segsvc-store, or to start an empty store on purpose (jobs whose
    files were in the old one then answer 410). Processes that refused the folder (503:
    not the store) accept it within 10 s."""
    from segsvc.blob_mark import adopt, read_mark
    from segsvc.blobs import blob_folder

    settings = get_settings()
    folder = blob_folder(settings)
    if not yes:
        found = read_mark(folder)
        click.confirm(
            f"Make {folder} ({'marked ' + found[:12] + '...' if found else 'no mark'}) the blob "
            "store? Files this database names that are not in it will answer 410",
            abort=True,
        )
    store_id, changed = adopt(settings, folder)
    what = "now the blob store" if changed else "already the blob store"
    click.echo(f"{folder} is {what} ({store_id[:12]}...)")


if __name__ == "__main__":  # pragma: no cover
    main()
