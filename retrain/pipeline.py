"""One retraining run: lock, snapshot the labels, fine-tune, evaluate both models, gate, register.

Every run leaves a `training_runs` row saying what it used and what it decided. The candidate
starts from the production weights, trains on the corrected masks plus the base training
folder, and is compared with production on the fixed evaluation folder (never trained on).
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import statistics
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select, update

from segsvc.blobs import blob_store
from segsvc.db import session_scope
from segsvc.digest import file_sha256
from segsvc.errors import ConflictError
from segsvc.files import replace_atomically
from segsvc.ml import IMAGE_SIZE
from segsvc.ml.preprocess import decode_mask_png
from segsvc.models import ModelStatus, ModelVersion, TrainingRun, db_time, utcnow
from segsvc.retrain_lock import Held, retrain_lock
from segsvc.services import feedback, model_files, registry, rollout
from segsvc.settings import Settings, get_settings

if TYPE_CHECKING:  # importing it at run time imports TensorFlow
    from retrain.dataset import NearDuplicateIndex

log = logging.getLogger(__name__)

TRAINED = ("completed",)  # run statuses whose labels count as used
# A scheduled run waits for a live canary's verdict this long at most: a canary that low traffic
# keeps short of SEG_CANARY_MIN_JOBS may never get one, and retraining must not stop for good.
CANARY_WAIT = timedelta(days=7)
LOG_CAP = 64 * 1024
# The loggers a run's stored log reads (retrain's first): its own, the labels' loader and the
# model code it calls (conversions, runtimes).
CAPTURED_LOGGERS = ("retrain", "segsvc.services.feedback", "segsvc.ml")
# How often a running run's log reaches its row, so that `GET /v1/models` and `segsvc retrain
# log` show its progress (phases, each epoch) while it runs for hours, not only once it ended.
PROGRESS_FLUSH_S = 10.0


class RetrainBusyError(ConflictError):
    code = "retrain_running"


@dataclass(frozen=True)
class RunResult:
    """How a run ended."""

    run_id: str
    status: str
    reason: str
    candidate_version: str | None = None
    candidate_status: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


def run_retraining(
    settings: Settings | None = None,
    *,
    trigger: str = "schedule",
    steps_per_epoch: int | None = None,
    batch_size: int = 16,
    latency_runs: int = 20,
) -> RunResult:
    """Run once if no other run holds the lock (RetrainBusyError otherwise)."""
    settings = settings or get_settings()
    with retrain_lock(settings) as acquired:
        if not acquired:
            raise RetrainBusyError("Another retraining run is in progress.")
        run = _Run(settings, trigger, steps_per_epoch, batch_size, latency_runs, acquired)
        result = run.execute()
        prune_model_files(settings)
        return result


def prune_model_files(settings: Settings) -> None:
    """Delete rejected versions' old model files and crashed runs' orphans; a run ends here,
    its candidate registered (or its file deleted), under the lock: no run is writing one."""
    try:
        pruned = model_files.prune_model_files(settings, holding_retrain_lock=True)
    except Exception:  # the run is recorded already; the next one tries again
        log.warning("could not prune the model files", exc_info=True)
        return
    if pruned.removed:
        log.info(
            "deleted %d old model files (%.0f MB) of rejected versions and crashed runs",
            len(pruned.removed),
            pruned.freed_bytes / 1e6,
        )


def gate(
    *,
    candidate: dict[str, Any],
    production: dict[str, Any],
    tolerance: float,
    latency_ratio: float,
    lineage_best: float | None = None,
) -> list[str]:
    """Why a candidate may not serve (empty: eligible): mIoU and batch-1 latency vs production.

    `lineage_best`: the best mIoU a production version before this one scored on the same
    evaluation set (`lineage_best_miou`). The tolerance is taken from the better of the two:
    judged against the version it replaces alone, each promotion could lose up to the
    tolerance and the losses added up, run after run."""
    problems = []
    c_iou, p_iou = float(candidate["mean_iou"]), float(production["mean_iou"])
    if not c_iou >= p_iou - tolerance:  # written so that NaN fails
        problems.append(f"mean IoU {c_iou:.4f} < production {p_iou:.4f} - {tolerance:g}")
    elif lineage_best is not None and not c_iou >= lineage_best - tolerance:
        problems.append(
            f"mean IoU {c_iou:.4f} < the best production before, {lineage_best:.4f} on this "
            f"evaluation set, - {tolerance:g}"
        )
    c_ms, p_ms = float(candidate["latency_ms_batch1"]), float(production["latency_ms_batch1"])
    if not c_ms <= p_ms * latency_ratio:
        problems.append(
            f"batch-1 latency {c_ms:.1f} ms{_timed_on(candidate)} > "
            f"{latency_ratio:g} x {p_ms:.1f} ms{_timed_on(production)}"
        )
    return problems


def _timed_on(metrics: dict[str, Any]) -> str:
    return f" ({metrics['runtime']})" if "runtime" in metrics else ""


def measure_latency(
    paths: list[str],
    settings: Settings,
    runs: int = 20,
    faithful: Sequence[Sequence[str]] | None = None,
) -> list[tuple[float, str]]:
    """Median batch-1 latency (ms) of each model on the runtime it is served with (`faithful`:
    each model's runtimes measured faithful, which `SEG_RUNTIME=auto` picks from), and that
    runtime's name; measured interleaved so load noise is shared."""
    from segsvc.ml.runtime import load_runtime, serving_batch_sizes

    sizes = serving_batch_sizes(settings.batch_max_size)
    runtimes = [
        load_runtime(
            p,
            kind=settings.runtime,
            threads=settings.inference_threads,
            artifact_dir=settings.artifact_dir,
            batch_sizes=sizes,
            faithful=kinds,
        )
        for p, kinds in zip(paths, faithful or [()] * len(paths), strict=True)
    ]
    x = np.random.default_rng(0).random((1, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    samples: list[list[float]] = [[] for _ in runtimes]
    for rt in runtimes:  # warm-up (tracing, allocation)
        rt.predict(x)
    for _ in range(runs):
        for i, rt in enumerate(runtimes):
            started = time.perf_counter()
            rt.predict(x)
            samples[i].append((time.perf_counter() - started) * 1000.0)
    return [(statistics.median(s), rt.name) for s, rt in zip(samples, runtimes, strict=True)]


class _Run:
    """The steps of one run; each DB write is its own short transaction."""

    def __init__(
        self,
        settings: Settings,
        trigger: str,
        steps: int | None,
        batch_size: int,
        runs: int,
        lock: Held,
    ) -> None:
        self.settings, self.trigger = settings, trigger
        self.steps, self.batch_size, self.latency_runs = steps, batch_size, runs
        self.lock = lock
        self.started = time.monotonic()
        self.log_buffer = io.StringIO()
        self.run_id = uuid.uuid4()
        self.registered = False  # the candidate's file is in the registry: never delete it
        # The registering transaction was sent: if its answer was lost, it may have committed.
        self.registering = False

    def execute(self) -> RunResult:
        with self._capture_logs(), self._progress_flushed():
            self._open()
            out: Path | None = None
            try:
                plan = self._snapshot()
                if isinstance(plan, RunResult):
                    return plan
                out = self._artifact_path()
                return self._train_and_gate(plan, out)
            except Exception as exc:
                log.error("retraining failed: %s\n%s", exc, traceback.format_exc())
                if out is not None and not self._maybe_registered(out):
                    for path in (out, out.with_suffix(".json"), out.with_suffix(".png")):
                        path.unlink(missing_ok=True)
                return self._finish("failed", f"{type(exc).__name__}: {exc}")

    def _maybe_registered(self, out: Path) -> bool:
        """Whether a version may name `out`: registered, or its commit's answer was lost (then
        the registry says; when it cannot, the file stays, for the pruner to judge later)."""
        if self.registered:
            return True
        if not self.registering:
            return False
        try:
            with session_scope(self.settings) as session:
                return registry.version_for_path(session=session, path=out.resolve()) is not None
        except Exception:
            return True

    def _open(self) -> None:
        with session_scope(self.settings) as session:
            # We hold the lock, so any other 'running' row is a run that died mid-way.
            stale_runs = select(TrainingRun).where(TrainingRun.status == "running")
            # On the database's clock: the newest trained run (by `started_at`) says which
            # labels are used, and runs may start on hosts whose clocks disagree (the
            # maintenance worker's schedule, an operator's `segsvc retrain now`).
            now = db_time(session)
            for stale in session.scalars(stale_runs):
                stale.status, stale.reason = "failed", "interrupted (the process running it ended)"
                stale.completed_at = now
            session.add(
                TrainingRun(id=self.run_id, status="running", trigger=self.trigger, started_at=now)
            )
        log.info("retraining run %s started (%s)", self.run_id, self.trigger)

    def _snapshot(self) -> dict[str, Any] | RunResult:
        """Labeled feedback ids (recorded), the production version, and whether to go on."""
        cfg = self.settings
        with session_scope(cfg) as session:
            ids = feedback.labeled_feedback_ids(session=session)  # oldest first
            # The newest SEG_RETRAIN_MAX_LABELS only: the labels only grow, and a run's memory
            # grows with them. One older than the newest N never comes back (as below).
            over_cap = max(0, len(ids) - cfg.retrain_max_labels)
            ids = ids[over_cap:]
            # Every label used before that still exists is in the newest trained run's list: a
            # label that leaves the snapshot (its input purged, its mask replaced) never comes
            # back. So one row is read, not every run's.
            latest = session.scalars(
                select(TrainingRun.feedback_ids)
                .where(TrainingRun.status.in_(TRAINED))
                .order_by(TrainingRun.started_at.desc())
                .limit(1)
            ).first()
            used = set(latest or [])
            new = [i for i in ids if str(i) not in used]
            production = registry.production_version(session=session)
            # A scheduled run waits for a canary's verdict: its candidate would supersede the
            # canary, and on low traffic no canary would ever be promoted. An operator's run
            # (`segsvc retrain now`) goes on, and so does one once the canary is CANARY_WAIT old.
            canary = rollout.canary_version(session=session) if self.trigger == "schedule" else None
            if (
                canary is not None
                and canary.promoted_at is not None
                and canary.promoted_at < db_time(session) - CANARY_WAIT
            ):
                log.info(
                    "canary %s waited %s for its verdict: training goes on",
                    canary.version,
                    CANARY_WAIT,
                )
                canary = None
            waiting = canary.version if canary is not None else None
            run = session.get(TrainingRun, self.run_id)
            assert run is not None
            # A run that goes on keeps every id it snapshotted (exactly what it trains on); a
            # skipped one (the daily case) only its new ones, so rows no longer grow with
            # every label ever given.
            skipping = len(new) < cfg.retrain_min_new_labels or waiting is not None
            run.feedback_ids = [str(i) for i in (new if skipping else ids)]
            run.data_counts = {"labels": len(ids), "new_labels": len(new), "over_cap": over_cap}
            run.production_version = production.version if production else None
            plan: dict[str, Any] = {
                "ids": ids,
                "production": _row(production) if production else None,
            }
        if skipping and waiting is None:
            return self._finish(
                "skipped",
                f"{len(new)} new labels since the last run; {cfg.retrain_min_new_labels} needed",
            )
        if skipping:
            return self._finish(
                "skipped",
                f"canary {waiting} is still collecting its verdict; a scheduled run waits for "
                f"it, its {len(new)} new labels kept for the next one (`segsvc retrain now` "
                "trains anyway, and its candidate supersedes the canary)",
            )
        if plan["production"] is None:
            return self._finish("failed", "no production version to fine-tune")
        if cfg.eval_data_dir is None:
            return self._finish(
                "failed",
                "SEG_EVAL_DATA_DIR is not set: retraining needs an evaluation folder (Oxford "
                "layout, never trained on) to compare the candidate with production",
            )
        if not Path(cfg.eval_data_dir).is_dir():
            return self._finish("failed", f"evaluation folder not found: {cfg.eval_data_dir}")
        if cfg.train_data_dir is not None and not Path(cfg.train_data_dir).is_dir():
            return self._finish("failed", f"training folder not found: {cfg.train_data_dir}")
        from retrain.dataset import (
            DatasetLayoutError,
            NearDuplicateIndex,
            evaluation_set_id,
            folder_overlap,
            image_digests_by_path,
            usable_pairs,
        )

        try:
            # Pairs the evaluation will decode (by its own skip rules), not image files: before
            # hours of training, not after.
            usable = usable_pairs(cfg.eval_data_dir)
        except DatasetLayoutError as exc:
            return self._finish("failed", f"evaluation folder: {exc}")
        if len(usable) < cfg.gate_min_eval_images:
            return self._finish("failed", self._too_few_eval_images(len(usable), "usable "))
        # Hashed once: for the folder check here, for the labels left out of training (the
        # same files, and resized, re-encoded, mirrored or cropped copies of them), and for the
        # evaluation set's identity (mIoUs compare across runs only on the same photos with
        # the same trimaps).
        digests = image_digests_by_path(cfg.eval_data_dir)
        plan["held_out"] = set(digests.values())
        plan["eval_set"] = evaluation_set_id(usable, digests)
        plan["held_out_index"] = NearDuplicateIndex.of_folder(cfg.eval_data_dir)
        if cfg.train_data_dir is not None:
            try:
                overlap = folder_overlap(
                    cfg.train_data_dir,
                    cfg.eval_data_dir,
                    plan["held_out"],
                    eval_index=plan["held_out_index"],
                )
            except DatasetLayoutError as exc:
                return self._finish("failed", f"training folder: {exc}")
            if overlap:  # the gate would score the candidate on images it trained on
                return self._finish("failed", f"evaluation images would be trained on: {overlap}")
        log.info(
            "snapshot: %d labels (%d new), production %s",
            len(ids),
            len(new),
            plan["production"]["version"],
        )
        return plan

    def _too_few_eval_images(self, count: int, kind: str = "") -> str:
        return (
            f"{count} {kind}image/trimap pairs in the evaluation folder "
            f"{self.settings.eval_data_dir}; the gate needs "
            f"{self.settings.gate_min_eval_images} (SEG_GATE_MIN_EVAL_IMAGES)"
        )

    def _artifact_path(self) -> Path:
        return model_files.candidate_path(self.settings, run_id=self.run_id, at=utcnow())

    def _train_and_gate(self, plan: dict[str, Any], out: Path) -> RunResult:
        cfg = self.settings
        production = plan["production"]
        _check_production_file(production)  # before hours of training from it
        samples, label_counts = self._load_labels(
            plan["ids"], plan["held_out"], plan["held_out_index"]
        )
        # Recorded now: a run that fails later (training, evaluation) kept only its snapshot's
        # counts, and why labels were left out went unsaid.
        self._record_counts(label_counts)
        if not len(samples) and cfg.train_data_dir is None:
            # Labels only, and none usable: training failed on an empty temporary folder, and
            # the next run, finding the same labels new, failed alike every day. Completed
            # (its labels count as used): the next run waits for new ones.
            left = ", ".join(
                f"{count} {name.removeprefix('feedback_').replace('_', ' ')}"
                for name, count in label_counts.items()
                if name != "feedback_samples" and count
            )
            return self._finish(
                "completed",
                f"nothing to train on: none of the {len(plan['ids'])} labels is usable "
                f"({left or 'none decoded'}) and SEG_TRAIN_DATA_DIR is not set; no candidate, "
                "and the next run waits for new labels",
            )
        report = self._fine_tune(samples, production["path"], out)
        cand_metrics, prod_metrics = self._evaluate(str(out), production)
        earlier = lineage_best_miou(production["metrics"], plan["eval_set"])
        problems = gate(
            candidate=cand_metrics,
            production=prod_metrics,
            tolerance=cfg.gate_miou_tolerance,
            latency_ratio=cfg.gate_latency_ratio,
            lineage_best=earlier,
        )
        # What the candidate's successors are held to: the best of its line on this set.
        best = max(float(prod_metrics["mean_iou"]), earlier if earlier is not None else -1.0)
        lineage = {"eval_set": plan["eval_set"], "mean_iou": best}
        sha = file_sha256(out)
        version = f"{out.stem}-{sha[:8]}"
        counts = {  # beside the label counts, recorded once loaded (`_record_counts`)
            "training": report.data,
            "eval_images": cand_metrics["images"],
        }
        if not self.lock.still_held():
            # Its database session ended (a restart, a failover): another run may hold the
            # lock now and register its own candidate; this one is not registered.
            raise RuntimeError(
                "the retraining lock was lost during the run (its database "
                "connection ended); the candidate is not registered"
            )
        self.registering = True
        with session_scope(cfg) as session:
            registry.register_version(
                session=session,
                version=version,
                path=out.resolve(),
                sha256=sha,
                parent_version=production["version"],
                metrics={
                    **_version_metrics(cand_metrics, prod_metrics, production, self.run_id),
                    "lineage_best": lineage,
                },
            )
            rollout.lock_registry(session)  # no promote or rollback between check and canary
            now_serving = registry.production_version(session=session)
            changed = now_serving is None or now_serving.version != production["version"]
            if changed:
                # An operator promoted or rolled back (or a canary was promoted) while this run
                # trained: the candidate descends from, and was gated against, a version that
                # no longer serves.
                problems = [
                    f"production changed from {production['version']} to "
                    f"{now_serving.version if now_serving else 'none'} during training"
                ]
            if problems:
                reason = "gate: " + "; ".join(problems)
                rollout.reject(session=session, version=version, reason=reason)
                status, summary = ModelStatus.REJECTED, f"candidate {version} rejected ({reason})"
            else:
                rollout.start_canary(session=session, version=version, share=cfg.canary_share)
                status = ModelStatus.CANARY
                summary = f"candidate {version} passed the gate; canary at {cfg.canary_share:.0%}"
            run = session.get(TrainingRun, self.run_id)
            assert run is not None
            run.candidate_version = version
            run.candidate_metrics = cand_metrics
            run.production_metrics = prod_metrics
            run.data_counts = {**run.data_counts, **counts}
        self.registered = True
        log.info("%s", summary)
        if changed:  # not a verdict on the labels: the next run counts them as new again
            return self._finish(
                "failed",
                f"{summary}; its labels count as new for the next run",
                version,
                str(status),
            )
        return self._finish("completed", summary, version, str(status))

    def _record_counts(self, counts: dict[str, int]) -> None:
        with session_scope(self.settings) as session:
            run = session.get(TrainingRun, self.run_id)
            assert run is not None
            run.data_counts = {**run.data_counts, **counts}

    def _load_labels(
        self, ids: list[uuid.UUID], held_out: set[str], held_out_index: NearDuplicateIndex
    ) -> tuple[Any, dict[str, int]]:
        """The labels decoded straight to model size (`retrain.dataset.Decoded`), streamed from
        the database: each upload (up to 10 MB) and full-size mask is dropped once its 128x128
        pair is made, so a run holds ~64 KB a label, not every label's bytes. With the counts
        of what was left out, and why."""
        from retrain.dataset import decode_samples

        cfg = self.settings
        left_out = {"in_eval_set": 0, "input_missing": 0}

        def pairs() -> Iterator[tuple[bytes, Any]]:
            with session_scope(cfg) as session:
                for label in feedback.iter_labeled_inputs(
                    session=session, feedback_ids=ids, store=blob_store(cfg)
                ):
                    if label.image is None:
                        left_out["input_missing"] += 1
                    # A client may upload an evaluation image (public datasets are) and label
                    # it: trained on, it would flatter the candidate at the gate. An app that
                    # shrinks or re-encodes photos before upload sends other bytes of the same
                    # picture, which the training folder's check refuses alike.
                    elif (
                        hashlib.sha256(label.image).hexdigest() in held_out
                        or held_out_index.copy_of(label.image) is not None
                    ):
                        left_out["in_eval_set"] += 1
                    else:
                        yield label.image, decode_mask_png(label.mask_png)

        decoded = decode_samples(pairs(), prefix="feedback")
        undecodable = sum(decoded.stats.skipped.values())
        loaded = decoded.stats.found + left_out["in_eval_set"] + left_out["input_missing"]
        counts = {
            "feedback_samples": len(decoded),
            "feedback_in_eval_set": left_out["in_eval_set"],
            "feedback_input_missing": left_out["input_missing"],
            "feedback_undecodable": undecodable,
            # purged, or its mask replaced, between the snapshot and the load
            "feedback_gone": len(ids) - loaded,
        }
        if left_out["in_eval_set"]:
            log.warning(
                "left out %d labels whose image is in the evaluation set", left_out["in_eval_set"]
            )
        if left_out["input_missing"] or undecodable or counts["feedback_gone"]:
            log.warning(
                "left out %d labels whose input file is missing or damaged, %d that did not "
                "decode and %d whose input or mask went since the snapshot",
                left_out["input_missing"],
                undecodable,
                counts["feedback_gone"],
            )
        return decoded, counts

    def _fine_tune(self, samples: Any, init_model: str, out: Path) -> Any:
        from retrain.train import train

        cfg = self.settings
        scratch = cfg.var_dir / "retrain" / str(self.run_id)
        # The checkpoint folder goes whatever the run's end: a run that fails (a bad training
        # folder, memory) left tens of MB on the models volume each time.
        with tempfile.TemporaryDirectory() as empty, _removed_after(scratch):
            data_dir = cfg.train_data_dir
            if data_dir is None:  # labels only: an empty Oxford-layout folder
                data_dir = Path(empty)
                (data_dir / "images").mkdir()
            report = train(
                data_dir=data_dir,
                epochs=cfg.retrain_epochs,
                out=out,
                batch_size=self.batch_size,
                learning_rate=cfg.retrain_learning_rate,
                init_model=init_model,
                extra_samples=samples,
                progress=False,
                steps_per_epoch=self.steps,
                checkpoint=scratch / "best.keras",
                evaluate_after=False,
            )
        log.info("fine-tuned %s in %.0fs: %s", out.name, report.duration_seconds, report.data)
        return report

    def _evaluate(
        self, candidate: str, production: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        from retrain.evaluate import evaluate_model
        from segsvc.ml.runtime import faithful_runtimes
        from segsvc.ml.unet import load_model

        eval_dir = self.settings.eval_data_dir
        assert eval_dir is not None
        results, classes = [], []
        _check_production_file(production)  # again: training took hours
        for path in (candidate, production["path"]):
            metrics = evaluate_model(load_model(path), eval_dir, split="all", keep_classes=True)
            if metrics["images"] < self.settings.gate_min_eval_images:  # some did not decode
                raise ValueError(self._too_few_eval_images(metrics["images"], "usable "))
            classes.append(metrics.pop("_classes"))
            results.append(metrics)
        results[0].update(
            self._comparison_sheet(Path(candidate), eval_dir, production["version"], classes)
        )
        if self.settings.runtime == "auto":
            # First: which runtime serves the candidate depends on it (LiteRT int8 only when
            # faithful), and so does the latency the gate compares.
            results[0].update(self._faithful_runtimes(candidate, eval_dir))
        # Each model timed on the runtime a worker serves it with: production by its own
        # version's measure, the candidate by the one just taken.
        served = [faithful_runtimes(m).trusted for m in (results[0], production["metrics"])]
        latencies = measure_latency(
            [candidate, production["path"]], self.settings, self.latency_runs, served
        )
        for metrics, (ms, runtime) in zip(results, latencies, strict=True):
            metrics["latency_ms_batch1"] = round(ms, 3)
            metrics["runtime"] = runtime
        log.info(
            "candidate mIoU %.4f, %.1f ms (%s); production mIoU %.4f, %.1f ms (%s)",
            results[0]["mean_iou"],
            latencies[0][0],
            latencies[0][1],
            results[1]["mean_iou"],
            latencies[1][0],
            latencies[1][1],
        )
        return results[0], results[1]

    def _comparison_sheet(
        self, candidate: Path, eval_dir: Path, production: str, classes: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Draw what the numbers stand for, beside the candidate (`<candidate>.png`): photo |
        truth | production | candidate on the evaluation photos where the two disagree most.
        `GET /v1/models/<version>/comparison.png` serves it. A sheet that cannot be drawn is
        logged; the run goes on."""
        from retrain.evaluate import comparison_sheet

        path = candidate.with_suffix(".png")
        try:
            sheet, names = comparison_sheet(
                eval_dir, [(f"production {production}", classes[1]), ("candidate", classes[0])]
            )
            replace_atomically(path, lambda tmp: sheet.save(tmp, format="PNG", optimize=True))
        except Exception:
            log.warning("could not draw the comparison sheet", exc_info=True)
            return {}
        log.info("comparison sheet %s: %s", path.name, ", ".join(names))
        return {"comparison_sheet": path.name, "comparison_images": names}

    def _faithful_runtimes(self, candidate: str, eval_dir: Path) -> dict[str, Any]:
        """Which faster CPU runtimes stay faithful to the candidate (`SEG_RUNTIME=auto` serves
        LiteRT int8 only for a version whose metrics list it); none when the check fails, so
        the candidate is then served by exact ONNX Runtime float32."""
        from retrain.evaluate import runtime_agreement
        from segsvc.ml.runtime import CPU_FASTER

        try:
            agreement = runtime_agreement(
                candidate, eval_dir, kinds=CPU_FASTER, artifact_dir=self.settings.artifact_dir
            )
        except Exception:
            log.warning("could not measure the candidate's converted runtimes", exc_info=True)
            return {"faithful_runtimes": []}
        log.info("runtime agreement with float32 Keras: %s", agreement)
        return {
            "runtime_agreement": agreement,
            "faithful_runtimes": [k for k, v in agreement.items() if v["faithful"]],
        }

    def _finish(
        self, status: str, reason: str, version: str | None = None, outcome: str | None = None
    ) -> RunResult:
        log.info("run %s %s: %s", self.run_id, status, reason)
        with session_scope(self.settings) as session:
            run = session.get(TrainingRun, self.run_id)
            assert run is not None
            run.status, run.reason, run.completed_at = status, reason, db_time(session)
            run.duration_s = round(time.monotonic() - self.started, 2)
            run.log = self.log_buffer.getvalue()[-LOG_CAP:]
        return RunResult(str(self.run_id), status, reason, version, outcome)

    @contextmanager
    def _progress_flushed(self) -> Iterator[None]:
        """The block, while a thread copies the run's log so far to its row every
        PROGRESS_FLUSH_S seconds (when it grew). Only while the row says `running`: the final
        write (`_finish`) is never overwritten, whichever transaction commits first."""
        stop = threading.Event()
        flushed = 0

        def flush() -> None:
            nonlocal flushed
            text = self.log_buffer.getvalue()
            if len(text) == flushed:
                return
            with session_scope(self.settings) as session:
                session.execute(
                    update(TrainingRun)
                    .where(TrainingRun.id == self.run_id, TrainingRun.status == "running")
                    .values(log=text[-LOG_CAP:])
                    .execution_options(synchronize_session=False)
                )
            flushed = len(text)

        def loop() -> None:
            while not stop.wait(PROGRESS_FLUSH_S):
                try:
                    flush()
                except Exception:  # the database away for a while: the next tick tries again
                    log.debug("could not store the run's progress", exc_info=True)

        flusher = threading.Thread(target=loop, name="retrain-progress", daemon=True)
        flusher.start()
        try:
            yield
        finally:
            stop.set()
            flusher.join()

    @contextmanager
    def _capture_logs(self) -> Iterator[None]:
        """Keep this run's log lines for its row: those of its own thread (the maintenance
        worker's other thread logs canary verdicts and retention passes meanwhile) from
        retraining and from the services it calls (labels left out, conversions that failed)."""
        handler = logging.StreamHandler(self.log_buffer)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        run_thread = threading.get_ident()
        handler.addFilter(lambda record: record.thread == run_thread)
        loggers = [logging.getLogger(name) for name in CAPTURED_LOGGERS]
        old_level = loggers[0].level
        for logger in loggers:
            logger.addHandler(handler)
        if loggers[0].getEffectiveLevel() > logging.INFO:  # retrain's own INFO lines
            loggers[0].setLevel(logging.INFO)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
            loggers[0].setLevel(old_level)


def lineage_best_miou(metrics: dict[str, Any], eval_set: str) -> float | None:
    """The best mIoU production versions before this version scored on `eval_set`, as its
    registration recorded (None: none recorded, or on another evaluation set)."""
    lineage = metrics.get("lineage_best")
    if not isinstance(lineage, dict) or lineage.get("eval_set") != eval_set:
        return None
    value = lineage.get("mean_iou")
    return float(value) if isinstance(value, int | float) else None


def _row(version: ModelVersion) -> dict[str, Any]:
    return {
        "version": version.version,
        "path": version.path,
        "sha256": version.sha256,
        "metrics": dict(version.metrics),
    }


def _check_production_file(production: dict[str, Any]) -> None:
    """Fail the run unless production's file still holds the weights its version names: a file
    replaced at its path (a `git pull` of a new baseline, a `segsvc train --out` over it) would
    have the candidate fine-tuned from, and gated against, weights that never served."""
    from segsvc.ml.convert import ModelFileMismatchError, check_model_file

    try:
        check_model_file(production["path"], production["sha256"])
    except ModelFileMismatchError as exc:
        raise ModelFileMismatchError(f"production {production['version']}: {exc}") from None


def _version_metrics(
    cand: dict[str, Any], prod: dict[str, Any], production: dict[str, Any], run_id: uuid.UUID
) -> dict[str, Any]:
    """What `GET /v1/models` shows for a candidate: its numbers and production's beside them."""
    keys = ("mean_iou", "pixel_accuracy", "per_class_iou", "latency_ms_batch1", "images")
    return {
        **{k: cand[k] for k in keys},
        # The runtime each latency was timed on: the one a worker serves that version with.
        **({"latency_runtime": cand["runtime"]} if "runtime" in cand else {}),
        "original_resolution": {
            k: cand["original_resolution"][k] for k in ("mean_iou", "pixel_accuracy")
        },
        "evaluated_against": {
            "version": production["version"],
            **{k: prod[k] for k in keys},
            **({"latency_runtime": prod["runtime"]} if "runtime" in prod else {}),
        },
        "training_run": str(run_id),
        # What `SEG_RUNTIME=auto` reads to serve a faster runtime for this version.
        **{k: cand[k] for k in ("faithful_runtimes", "runtime_agreement") if k in cand},
        # Photo | truth | production | candidate, beside the model file (`_comparison_sheet`).
        **{k: cand[k] for k in ("comparison_sheet", "comparison_images") if k in cand},
    }


@contextmanager
def _removed_after(folder: Path) -> Iterator[None]:
    """The block, then `folder` and what it holds deleted (best effort), however it ends."""
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)
