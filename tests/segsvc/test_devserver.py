"""segsvc/devserver.py (`segsvc run`): every process it starts serves on 127.0.0.1 only,
/metrics included."""

from __future__ import annotations

import json
import subprocess
import sys

from segsvc import devserver
from segsvc.settings import Settings
from tests.conftest import ROOT, free_port

PROBE = """
import json
from worker.metrics_server import _started, start_metrics_server
from segsvc.settings import get_settings
port = get_settings().metrics_port
start_metrics_server(port)
print(json.dumps(list(_started[port][0].server_address[:2])))
"""


def test_run_serves_each_process_metrics_on_loopback_on_its_own_port() -> None:
    base = free_port()
    settings = Settings(metrics_port=base, _env_file=None)
    names = list(devserver.process_commands(settings, api_workers=1))
    envs = devserver.process_envs(settings, {"KEEP": "1"}, names)
    assert {env["SEG_METRICS_BIND"] for env in envs.values()} == {"127.0.0.1"}
    assert all(env["KEEP"] == "1" for env in envs.values())
    ports = [int(env["SEG_METRICS_PORT"]) for env in envs.values()]
    assert len(set(ports)) == len(names)
    assert ports[names.index("api")] == base


def test_a_worker_started_by_run_binds_its_metrics_to_loopback() -> None:
    """The environment `segsvc run` gives beat, read back by the real metrics server."""
    settings = Settings(metrics_port=free_port() - 4, _env_file=None)
    env = devserver.process_envs(settings, {"PATH": "/usr/bin:/bin"}, ["beat"])["beat"]
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    host, port = json.loads(out.strip().splitlines()[-1])
    assert (host, port) == ("127.0.0.1", int(env["SEG_METRICS_PORT"]))
