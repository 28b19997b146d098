#!/usr/bin/env bash
# Start the local PostgreSQL and Redis the tests use, if they are not already running.
# Installs them from Debian packages when they are missing (needs root, as on CI).
# A PostgreSQL cluster this script installs or creates trusts TCP connections from 127.0.0.1
# (the tests connect as postgres@127.0.0.1 without a password); an existing cluster's
# authentication is never changed.
set -euo pipefail

PG_ETC=${PG_ETC:-/etc/postgresql}          # overridable for tests/ops/test_ensure_services.py
PG_LIB=${PG_LIB:-/usr/lib/postgresql}
CREATED_MARK=segsvc-created-this-cluster   # in the cluster's config folder
TRUST_LINE="host all all 127.0.0.1/32 trust"

newest() { ls "$1" 2>/dev/null | sort -V | tail -n 1; }

# Put the trust line before every other rule (pg_hba.conf: the first matching line wins).
trust_loopback() {
  local conf="$1/pg_hba.conf" tmp
  if grep -qxF "$TRUST_LINE" "$conf"; then
    return 0
  fi
  tmp=$(mktemp)
  awk -v line="$TRUST_LINE" '
    !done && $0 !~ /^[[:space:]]*(#|$)/ {
      print "# Added by segsvc scripts/ensure-services.sh (local tests, no password)"
      print line
      done = 1
    }
    { print }
    END { if (!done) print line }' "$conf" >"$tmp"
  cat "$tmp" >"$conf"  # keeps the file's owner and mode
  rm -f "$tmp"
  echo "PostgreSQL: trusting TCP connections from 127.0.0.1 ($conf)"
}

need_install=()
command -v pg_ctlcluster >/dev/null 2>&1 || need_install+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need_install+=(redis-server)
if ((${#need_install[@]})); then
  echo "installing ${need_install[*]} from Debian packages"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_install[@]}"
  # The package created its cluster just now: it is ours to configure.
  if [[ " ${need_install[*]} " == *" postgresql "* ]]; then
    version=$(newest "$PG_ETC")
    if [[ -n "$version" && -d "$PG_ETC/$version/main" ]]; then
      touch "$PG_ETC/$version/main/$CREATED_MARK"
    fi
  fi
fi

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  version=$(newest "$PG_ETC")
  if [[ -z "$version" || ! -d "$PG_ETC/$version/main" ]]; then
    version=$(newest "$PG_LIB")
    echo "creating PostgreSQL $version cluster main"
    pg_createcluster "$version" main
    touch "$PG_ETC/$version/main/$CREATED_MARK"
  fi
  if [[ -f "$PG_ETC/$version/main/$CREATED_MARK" ]]; then
    trust_loopback "$PG_ETC/$version/main"
  fi
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
else
  # Running already (a package install may start it): configure only a cluster we created.
  version=$(newest "$PG_ETC")
  if [[ -n "$version" && -f "$PG_ETC/$version/main/$CREATED_MARK" ]] &&
    ! grep -qxF "$TRUST_LINE" "$PG_ETC/$version/main/pg_hba.conf"; then
    trust_loopback "$PG_ETC/$version/main"
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  fi
fi
pg_isready -h 127.0.0.1 -p 5432

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 1 30); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 0.5; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping
