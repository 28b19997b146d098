"""`make bench`: raw runtimes, the running system, the naive baseline; writes BENCHMARKS.md.

Everything runs on this machine in one go (< 15 minutes): services on loopback ports with their
own Postgres database and Redis logical DB. `python -m bench.run --help` for options.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import history, load, raw, report, system
from segsvc.client import LONG_POLL_S
from segsvc.digest import file_sha256
from segsvc.settings import ROOT, Settings

ROUNDS = 3  # compared runs alternate this many times; the median round counts
REFERENCE_SECONDS = 1.0  # per runtime and batch size, each time the raw reference is re-timed

T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--model",
        type=Path,
        default=ROOT / "models" / "baseline.keras",
        help="model to serve (a random-init U-Net when the file does not exist)",
    )
    p.add_argument(
        "--data", type=Path, default=load.DEFAULT_DATA, help="Oxford-layout sample folder"
    )
    p.add_argument("--runtime", default="auto", help="runtime the served system uses")
    p.add_argument("--var-dir", type=Path, default=ROOT / "var" / "bench")
    p.add_argument("--seconds", type=float, default=20.0, help="duration of each load run")
    p.add_argument("--raw-seconds", type=float, default=3.0, help="per runtime and batch size")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--burst-jobs", type=int, default=600, help="jobs in the capacity run")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    args.var_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": report.machine(),
        "load_before": os.getloadavg(),
    }
    model = resolve_model(args)
    results["model"] = {
        "path": str(model),
        "sha256": file_sha256(model),
        "trained": model == args.model,
    }
    images, masks, photos = read_data(args.data)
    log(f"model {model.name}; {len(images)} validation images; {len(photos)} photos")
    results["matmul_gflops"] = raw.matmul_gflops()
    results["matmul_blas_core"] = raw.blas_core()
    log(
        f"numpy float32 matmul: {results['matmul_gflops']:.1f} GFLOP/s "
        f"(OpenBLAS kernels: {results['matmul_blas_core'] or 'unknown'})"
    )
    results["upload_validation_ms"] = upload_validation_ms(photos)
    log(f"the API's upload validation: {results['upload_validation_ms']:.2f} ms per photo")
    results["raw"] = raw.run_raw(
        model,
        artifact_dir=args.var_dir / "artifacts",
        sha256=results["model"]["sha256"],
        images=images,
        masks=masks,
        budget_s=args.raw_seconds,
        log=log,
    )
    results["naive_predict_b1"] = results["raw"].pop("naive_predict_b1")
    log(f"naive model.predict b1: {results['naive_predict_b1']:.1f} images/s")
    from segsvc.ml.runtime import resolve_kind

    # The served system gets the faithfulness measured here, as the registry's metrics of its
    # model version, so `auto` serves the fastest runtime this run found faithful.
    results["faithful_runtimes"] = [k for k, v in results["raw"].items() if v.get("faithful")]
    results["served_runtime"] = resolve_kind(args.runtime, results["faithful_runtimes"])
    log(f"faithful: {results['faithful_runtimes']}; serving {results['served_runtime']}")
    threads = Settings(_env_file=None).inference_threads
    log(f"raw: {results['served_runtime']} as the worker runs it ({threads} thread(s))")
    timer = raw.ServedTimer(
        model,
        kind=results["served_runtime"],
        threads=threads,
        artifact_dir=args.var_dir / "artifacts",
        sha256=results["model"]["sha256"],
        images=images,
    )
    results["served_raw"] = timer.full(args.raw_seconds)
    results.update(
        run_system(
            args,
            model,
            photos,
            results["faithful_runtimes"],
            reference=lambda: timer.batched(REFERENCE_SECONDS),
        )
    )
    results["load_after"] = os.getloadavg()
    results["seconds"] = time.monotonic() - T0
    results["targets"] = report.targets(results)
    write(results, args.out)
    log(f"done in {results['seconds']:.0f}s; wrote {args.out}")


def resolve_model(args: argparse.Namespace) -> Path:
    model: Path = args.model
    if model.is_file():
        return model
    path: Path = args.var_dir / "init.keras"
    if not path.is_file():
        from segsvc.ml.unet import build_unet

        build_unet().save(path)
    return path


def upload_validation_ms(photos: list[Path], passes: int = 3) -> float:
    """CPU ms of one thread per photo for the API's `validate_image` (sniff, decode, resize to
    the model input, sha256): the part of a submit that answering a corrupt upload with a 4xx
    needs. Best of `passes` over up to 64 photos, timed with the machine otherwise idle."""
    from segsvc.images import validate_image

    datas = [p.read_bytes() for p in photos[:64]]
    best = float("inf")
    for _ in range(passes):
        start = time.thread_time()
        for data in datas:
            validate_image(data, max_bytes=1 << 30, max_pixels=1 << 30)
        best = min(best, (time.thread_time() - start) / len(datas))
    return best * 1000.0


def read_data(folder: Path) -> tuple[Any, Any, list[Path]]:
    """Validation images (retrain's split, else the first 80) with labels, and photo paths."""
    from retrain.dataset import read_folder
    from segsvc.ml.preprocess import normalize

    data = read_folder(folder, split="val")
    if len(data) < 20:
        data = read_folder(folder, split="all")
        data.images, data.masks = data.images[:80], data.masks[:80]
    photos = load.sample_photos(folder)
    return normalize(data.images), data.masks, photos


def run_system(
    args: argparse.Namespace,
    model: Path,
    photos: list[Path],
    faithful: list[str],
    reference: Callable[[], dict[str, float]],
) -> dict[str, Any]:
    """The served system, API-only submits, hello, and the naive Flask baseline. `reference`
    re-times the raw runtime (best batched images/s, as served and on all cores); it runs
    just before and after each capacity burst, with the system idle."""
    from segsvc.db import session_scope
    from segsvc.migrate import upgrade
    from segsvc.ml.convert import CONVERTED_KINDS, converter_fingerprint
    from segsvc.models import ModelStatus
    from segsvc.services.keys import create_key
    from segsvc.services.registry import register_version

    url = system.fresh_database()
    env = system.bench_env(url, args.var_dir, SEG_RUNTIME=args.runtime)
    cfg = Settings(
        database_url=url, broker_url=system.REDIS_URL, var_dir=args.var_dir, _env_file=None
    )
    upgrade(settings=cfg)
    with session_scope(cfg) as session:
        register_version(
            session=session,
            version="bench",
            path=model.resolve(),
            status=ModelStatus.PRODUCTION,
            metrics={
                "faithful_runtimes": faithful,
                # Measured just now, with this venv's converters: the worker builds the same.
                "runtime_agreement": {
                    k: {"converter": converter_fingerprint(k)}
                    for k in faithful
                    if k in CONVERTED_KINDS
                },
            },
        )
        _, key = create_key(session=session, name="bench")
    headers = {"Authorization": f"Bearer {key}"}
    bodies = [load.multipart(p) for p in photos]
    logs = args.var_dir / "logs"
    logs.mkdir(exist_ok=True)
    out: dict[str, Any] = {}
    servers: list[system.Service] = []
    try:
        api_port, hello_port, naive_port = (system.free_port() for _ in range(3))
        api = system.gunicorn("api", "api.wsgi:app", api_port, env, logs, system.GUNICORN)
        servers.append(api)
        wkr = system.worker(env, logs, args.var_dir / "probes")
        servers.append(wkr)
        hello = system.gunicorn(
            "hello", "bench.hello_app:app", hello_port, env, logs, system.GUNICORN
        )
        servers.append(hello)
        naive = system.gunicorn(  # gunicorn's defaults: one sync worker, as people start
            "naive",
            "bench.naive_app:app",
            naive_port,
            {**env, "SEG_BENCH_MODEL": str(model)},
            logs,
            ["--workers", "1", "--timeout", "120"],
        )
        servers.append(naive)
        log("warm-up: the system and the naive baseline")
        load.run_jobs_load(api_port, headers, bodies, clients=4, seconds=3, poll_s=0.01)
        load.run_request_load(naive_port, "/predict", {}, bodies, clients=1, seconds=2, expect=200)
        both = {"api": api, "worker": wkr}
        log("system: idle latency (1 client)")
        out["idle"] = system.metered(
            both,
            lambda: load.run_jobs_load(
                api_port,
                headers,
                bodies,
                clients=1,
                seconds=args.seconds / 2,
                poll_s=0.005,
                wait_s=LONG_POLL_S,  # as `segsvc submit` and `client.submit(wait=)` do
            ),
        )
        log(f"{args.clients} clients: the system (long polls) and naive Flask, interleaved")
        seconds = args.seconds / ROUNDS
        out["system"], out["naive_flask"] = interleaved(
            {
                "system": (
                    both,
                    lambda: load.run_jobs_load(
                        api_port,
                        headers,
                        bodies,
                        clients=args.clients,
                        seconds=seconds,
                        poll_s=0.1,
                        wait_s=LONG_POLL_S,
                    ),
                ),
                "naive": (
                    {"naive": naive},
                    lambda: load.run_request_load(
                        naive_port,
                        "/predict",
                        {},
                        bodies,
                        clients=args.clients,
                        seconds=seconds,
                        expect=200,
                    ),
                ),
            }
        )
        log(
            f"  system {out['system']['jobs_per_s']:.1f} jobs/s, "
            f"naive {out['naive_flask']['jobs_per_s']:.1f} jobs/s"
        )
        per = load.BATCH_SUBMIT_IMAGES
        batch_bodies = load.batch_multiparts(photos, per)
        log(
            f"system: capacity, bursts of {args.burst_jobs} jobs sent one per request and "
            f"{per} per batch submit, alternating, the raw runtime re-timed between them"
        )
        out.update(
            capacity_rounds(
                both,
                reference,
                {
                    "system_peak": lambda: load.run_burst(
                        api_port, headers, bodies, jobs=args.burst_jobs, clients=args.clients
                    ),
                    "system_peak_batch": lambda: load.run_burst(
                        api_port,
                        headers,
                        batch_bodies,
                        jobs=args.burst_jobs,
                        clients=args.clients,
                        per_request=per,
                    ),
                },
            )
        )
        out["system_peak_batch"]["images_per_request"] = per
        out["worker_rss_mb"] = max(wkr.peak_rss_mb().values())
        wkr.stop()
        log("API-only submits (worker stopped) and the hello endpoints, interleaved")
        seconds = args.seconds / 2 / ROUNDS
        out["api_submit"], out["hello"], out["hello_upload"] = interleaved(
            {
                "submit": (
                    {"api": api},
                    lambda: load.run_request_load(
                        api_port,
                        "/v1/jobs",
                        headers,
                        bodies,
                        clients=args.clients,
                        seconds=seconds,
                        expect=202,
                    ),
                ),
                "hello": (
                    {"api": hello},
                    lambda: load.run_request_load(
                        hello_port,
                        "/hello",
                        {},
                        bodies,
                        clients=args.clients,
                        seconds=seconds,
                        expect=200,
                    ),
                ),
                "hello_upload": (
                    {"api": hello},
                    lambda: load.run_request_load(
                        hello_port,
                        "/hello-upload",
                        {},
                        bodies,
                        clients=args.clients,
                        seconds=seconds,
                        expect=200,
                    ),
                ),
            }
        )
        out["api_rss_mb"] = api.peak_rss_mb()
        out["naive_rss_mb"] = max(naive.peak_rss_mb().values())
    finally:
        for server in reversed(servers):
            server.stop()
    return out


def capacity_rounds(
    services: dict[str, system.Service],
    reference: Callable[[], dict[str, float]],
    bursts: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """Each burst ROUNDS times, alternating, with the raw runtime re-timed between any two (so
    each burst has a reference from just before and just after it); per burst the median
    round by jobs/s over the faster of the two, with every round's figures alongside."""
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in bursts}
    timed = reference()
    for _ in range(ROUNDS):
        for name, burst in bursts.items():
            result = system.metered(services, burst)
            after = reference()
            result["raw_beside"] = [timed, after]
            result["vs_raw"] = result["jobs_per_s"] / report.faster([timed, after])[0]
            timed = after
            rounds[name].append(result)
            log(
                f"  {name}: {result['jobs_per_s']:.1f} jobs/s, {result['vs_raw']:.2f} of raw "
                f"as served ({result['raw_beside'][0]['served']:.1f} / {after['served']:.1f} "
                "img/s before / after)"
            )
    return {name: median_round(results, by="vs_raw") for name, results in rounds.items()}


def interleaved(runs: dict[str, tuple[dict[str, system.Service], Any]]) -> list[dict[str, Any]]:
    """Each run ROUNDS times, alternating, so a change in the machine's load hits them alike;
    per run the median round (by jobs/s), with every round's jobs/s alongside."""
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, (services, run) in runs.items():
            rounds[name].append(system.metered(services, run))
    return [median_round(results, by="jobs_per_s") for results in rounds.values()]


def median_round(results: list[dict[str, Any]], *, by: str) -> dict[str, Any]:
    """The median of a run's rounds by `by`, with every round's jobs/s (and `by`) alongside."""
    median = dict(sorted(results, key=lambda r: r[by])[len(results) // 2])
    median["rounds_jobs_per_s"] = [r["jobs_per_s"] for r in results]
    if by != "jobs_per_s":
        median[f"rounds_{by}"] = [r[by] for r in results]
    return median


def write(results: dict[str, Any], out: Path) -> None:
    folder = ROOT / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = results["started"].replace(":", "").replace("+0000", "Z")
    text = json.dumps(results, indent=2, default=_jsonable)
    (folder / f"{stamp}.json").write_text(text)
    (folder / "latest.json").write_text(text)
    out.write_text(report.markdown(results))
    (folder / "HISTORY.md").write_text(history.markdown(history.load_runs(folder)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value))


if __name__ == "__main__":
    main()
