"""scripts/ensure-services.sh against stub Debian tools (apt-get, pg_ctlcluster, ...): a cluster
the script installs or creates trusts 127.0.0.1 (the tests connect as postgres@127.0.0.1 with
no password); a cluster it found keeps its authentication."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "ensure-services.sh"
TRUST = "host all all 127.0.0.1/32 trust"
DEBIAN_HBA = """\
# Database administrative login by Unix domain socket
local   all             postgres                                peer

# TYPE  DATABASE        USER            ADDRESS                 METHOD
local   all             all                                     peer
host    all             all             127.0.0.1/32            scram-sha-256
"""
TOOLS = ["awk", "cat", "grep", "ls", "mkdir", "mktemp", "rm", "seq", "sleep", "sort", "tail"]
TOOLS += ["touch", "cp", "chmod", "env"]

STUBS = {
    # The package manager: "installing" postgresql creates cluster 16/main (and its tools).
    "apt-get": """
echo "apt-get $*" >>"$STATE/log"
case "$*" in *install*postgresql*)
  cp "$STATE/pg-tools/"* "$STUBS/"
  pg_createcluster 16 main
  if [ -e "$STATE/autostart" ]; then touch "$STATE/running"; fi;;
esac""",
    "pg_isready": '[ -e "$STATE/running" ]',
    "redis-server": 'echo "redis-server $*" >>"$STATE/log"',
    "redis-cli": "echo PONG",
}
PG_TOOLS = {
    "pg_ctlcluster": """
echo "pg_ctlcluster $*" >>"$STATE/log"
case "$*" in *start*) touch "$STATE/running";; esac""",
    "pg_createcluster": """
echo "pg_createcluster $*" >>"$STATE/log"
mkdir -p "$PG_ETC/$1/$2"
cp "$STATE/pg_hba.default" "$PG_ETC/$1/$2/pg_hba.conf\"""",
}


@dataclass
class Machine:
    """A fake Debian machine: stub commands on PATH, /etc/postgresql under tmp_path."""

    root: Path

    @property
    def etc(self) -> Path:
        return self.root / "etc-postgresql"

    def hba(self, version: str = "16") -> str:
        return (self.etc / version / "main" / "pg_hba.conf").read_text()

    def log(self) -> list[str]:
        log = self.root / "state" / "log"
        return log.read_text().splitlines() if log.exists() else []

    def install_postgres(self, *, cluster: bool = True, running: bool = False) -> None:
        """PostgreSQL already there (not by the script), with or without a cluster."""
        for name in PG_TOOLS:
            shutil.copy(self.root / "state" / "pg-tools" / name, self.root / "stubs" / name)
        (self.root / "usr-lib-postgresql" / "16").mkdir(parents=True)
        if cluster:
            (self.etc / "16" / "main").mkdir(parents=True)
            (self.etc / "16" / "main" / "pg_hba.conf").write_text(DEBIAN_HBA)
        if running:
            (self.root / "state" / "running").touch()

    def run(self) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": f"{self.root / 'stubs'}:{self.root / 'tools'}",
            "STATE": str(self.root / "state"),
            "STUBS": str(self.root / "stubs"),
            "PG_ETC": str(self.etc),
            "PG_LIB": str(self.root / "usr-lib-postgresql"),
        }
        bash = shutil.which("bash")
        assert bash is not None
        return subprocess.run(
            [bash, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False
        )


def write_stub(path: Path, body: str) -> None:
    path.write_text(f"#!{shutil.which('bash')}\n{body.strip()}\n")
    path.chmod(0o755)


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    for folder in ("stubs", "tools", "state/pg-tools", "etc-postgresql"):
        (tmp_path / folder).mkdir(parents=True)
    for tool in TOOLS:
        real = shutil.which(tool)
        assert real is not None, tool
        os.symlink(real, tmp_path / "tools" / tool)
    for name, body in STUBS.items():
        write_stub(tmp_path / "stubs" / name, body)
    for name, body in PG_TOOLS.items():
        write_stub(tmp_path / "state" / "pg-tools" / name, body)
    (tmp_path / "state" / "pg_hba.default").write_text(DEBIAN_HBA)
    return Machine(tmp_path)


def rules(hba: str) -> list[str]:
    return [" ".join(line.split()) for line in hba.splitlines() if line.strip()[:1] not in "#"]


def test_fresh_machine_gets_a_cluster_that_trusts_loopback(machine: Machine) -> None:
    # Regression: the script installed PostgreSQL but left Debian's scram-sha-256 for
    # 127.0.0.1, so the tests' passwordless postgres@127.0.0.1 could not connect.
    result = machine.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert any("install" in line and "postgresql" in line for line in machine.log())
    assert rules(machine.hba())[0] == TRUST
    assert rules(machine.hba())[1:] == rules(DEBIAN_HBA)
    assert "pg_ctlcluster --skip-systemctl-redirect 16 main start" in machine.log()
    # Running it again changes nothing.
    assert machine.run().returncode == 0
    assert rules(machine.hba()).count(TRUST) == 1


def test_cluster_the_install_started_is_configured_and_reloaded(machine: Machine) -> None:
    (machine.root / "state" / "autostart").touch()
    result = machine.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert rules(machine.hba())[0] == TRUST
    assert "pg_ctlcluster --skip-systemctl-redirect 16 main reload" in machine.log()


def test_installed_postgres_without_a_cluster_gets_one_that_trusts_loopback(
    machine: Machine,
) -> None:
    machine.install_postgres(cluster=False)
    result = machine.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pg_createcluster 16 main" in machine.log()
    assert rules(machine.hba())[0] == TRUST


@pytest.mark.parametrize("running", [False, True])
def test_existing_cluster_keeps_its_authentication(machine: Machine, running: bool) -> None:
    machine.install_postgres(running=running)
    result = machine.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert machine.hba() == DEBIAN_HBA
    assert not any(line.startswith("apt-get") for line in machine.log())
    assert not any("reload" in line for line in machine.log())
    assert ("pg_ctlcluster --skip-systemctl-redirect 16 main start" in machine.log()) != running


def test_ci_leaves_postgres_and_redis_to_this_script() -> None:
    """.ci/run installed postgresql itself before calling the script, which then took the
    cluster for someone else's and left Debian's password rule: every test's connection was
    refused on a fresh machine. It installs make, which it calls."""
    ci = (Path(__file__).parents[2] / ".ci" / "run").read_text()
    installs = [line for line in ci.splitlines() if "apt_pkgs+=" in line]
    assert not [line for line in installs if "postgresql" in line or "redis" in line]
    assert any("(make)" in line for line in installs)
    assert ci.index("scripts/ensure-services.sh") < ci.index("make test")
