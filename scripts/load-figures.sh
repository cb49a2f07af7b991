#!/usr/bin/env bash
# The load figures of the README's performance section, on this machine: for each store
# (SQLite with the in-process gate, then PostgreSQL with the Redis gate) a fresh release server,
# the steady mix (peak RSS read after it), then a flash sale of 5,000 buyers for 100 units
# through the admission gate, the same sale without it, and a sale with as many buyers as units
# (nobody refused: what the sold journeys alone cost the store). Every run ends with the audit.
# Only loopback addresses are used.
#
# Usage: scripts/load-figures.sh [--steady 20s] [--buyers 5000] [--units 100] [--concurrency 64]
# Needs: a release build (cargo build --release), PostgreSQL on 127.0.0.1:5432 (createdb,
# dropdb), Redis on 127.0.0.1:6379. Environment: PGHOST (127.0.0.1), PGPORT (5432), PGUSER
# (root), REDIS_URL (redis://127.0.0.1:6379).
set -euo pipefail
cd "$(dirname "$0")/.."

steady=20s
buyers=5000
units=100
concurrency=64
while [ $# -gt 0 ]; do
    case "$1" in
        --steady) steady=$2; shift 2 ;;
        --buyers) buyers=$2; shift 2 ;;
        --units) units=$2; shift 2 ;;
        --concurrency) concurrency=$2; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "load-figures: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-root}
hf=${HOLDFAST_BIN:-${CARGO_TARGET_DIR:-target}/release/holdfast}
[ -x "$hf" ] || { echo "load-figures: build first: cargo build --release" >&2; exit 2; }
work=$(mktemp -d)
db="hf_load_$(date +%s)_$$"
server=

cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
    dropdb --if-exists "$db" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Starts a server on the store named by the arguments, waits until it is ready.
start() {
    port=$(free_port)
    target="http://127.0.0.1:$port"
    "$hf" serve --listen "127.0.0.1:$port" "$@" >"$work/server-$port.log" 2>&1 &
    server=$!
    for _ in $(seq 1 100); do
        curl -fs "$target/readyz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "load-figures: the server did not become ready" >&2
    cat "$work/server-$port.log" >&2
    exit 1
}

stop() {
    kill "$server"
    wait "$server" 2>/dev/null || true
    server=
}

rss() { awk '/VmHWM/ {print $2, $3}' "/proc/$server/status"; }

echo "# $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
for store in sqlite postgres; do
    flags=(--data-dir "$work/$store-data")
    if [ "$store" = postgres ]; then
        createdb "$db"
        flags+=(--database-url "postgres://$PGUSER@$PGHOST:$PGPORT/$db")
        flags+=(--redis-url "${REDIS_URL:-redis://127.0.0.1:6379}" --redis-key-prefix "$db:")
    fi
    echo
    echo "## $store"
    start "${flags[@]}"
    "$hf" loadgen steady --skus 200 --duration "$steady" --concurrency "$concurrency" \
        --target "$target" "${flags[@]}" 2>>"$work/progress.log"
    echo "peak RSS of the server after the steady mix: $(rss)"
    "$hf" loadgen flash-sale --buyers "$buyers" --units "$units" --concurrency "$concurrency" \
        --target "$target" "${flags[@]}" 2>>"$work/progress.log"
    "$hf" loadgen flash-sale --buyers "$buyers" --units "$units" --concurrency "$concurrency" \
        --no-gate --target "$target" "${flags[@]}" 2>>"$work/progress.log"
    "$hf" loadgen flash-sale --buyers "$units" --units "$units" --concurrency "$concurrency" \
        --target "$target" "${flags[@]}" 2>>"$work/progress.log"
    echo "peak RSS of the server after the flash sales: $(rss)"
    stop
done
