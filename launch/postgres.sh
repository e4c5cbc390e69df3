#!/usr/bin/env bash
# A PostgreSQL server on this machine for a shared label store (oracle.store=postgresql://...),
# as the tests and benchmarks/label_store.py use it: one cluster in DIR/data, listening on
# 127.0.0.1:PORT and a socket in DIR, user `apo` (trust authentication: local tests only), database `apo`.
#   bash launch/postgres.sh up DIR [PORT]   # install postgresql if missing, initdb, start; prints the URL
#   bash launch/postgres.sh down DIR        # stop it
# The URL is also written to DIR/url. Run as root, the server runs as the `postgres` OS user
# (postgres refuses root), so DIR must be reachable by it (e.g. under /tmp, not under a 0700 folder).
set -euo pipefail
usage="usage: postgres.sh up DIR [PORT] | down DIR"
action=${1:?$usage}
dir=$(realpath -m "${2:?$usage}")
port=${3:-55432}

bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
as_server() {  # run a server binary as the postgres OS user when we are root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case $action in
up)
  if [ -z "$(bindir)" ] || [ ! -x "$(bindir)/initdb" ]; then
    if [ "$(id -u)" != 0 ]; then echo "postgresql is not installed; as root: apt-get install postgresql" >&2; exit 1; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  fi
  bin=$(bindir)
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir" && chmod 700 "$dir"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_server "$bin/initdb" -D "$dir/data" -A trust -U apo >"$dir/initdb.log" 2>&1 || {
      echo "initdb failed; see $dir/initdb.log" >&2; tail -5 "$dir/initdb.log" >&2; exit 1; }
  fi
  as_server "$bin/pg_ctl" -D "$dir/data" -w -t 60 -l "$dir/log" \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >/dev/null || {
      echo "postgres did not start; end of $dir/log:" >&2; tail -5 "$dir/log" >&2; exit 1; }
  as_server "$bin/psql" -q -h 127.0.0.1 -p "$port" -U apo -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'apo'" | grep -q 1 || \
    as_server "$bin/createdb" -h 127.0.0.1 -p "$port" -U apo apo
  url="postgresql://apo@127.0.0.1:$port/apo"
  echo "$url" > "$dir/url"
  echo "$url"
  ;;
down)
  [ -f "$dir/data/postmaster.pid" ] || exit 0
  as_server "$(bindir)/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
  echo "postgres down"
  ;;
*) echo "$usage" >&2; exit 2 ;;
esac
