#!/usr/bin/env bash
# The database's own ceiling for a reservation (DESIGN §10), to read holdfast's figures
# against: pgbench runs exactly the reference scripts of ../shared/reference/pgbench/ — the
# guarded UPDATE of the product row and the INSERT of the reservation row as ONE statement in
# autocommit — and prints the transactions per second of each:
#   hot       hot_cte.sql      one unit of the one hot product
#   200-rows  steady_cart.sql  a cart of 1-3 distinct products of 200, 1-3 units a line
#
# It works in a scratch database it creates and drops, on the same PostgreSQL as holdfast,
# seeded as the reference README says (stock far beyond what a run can take).
#
# Usage: scripts/pgbench-ceiling.sh [--clients N] [--seconds S] [--only hot|200-rows]
# Environment: PGHOST (127.0.0.1), PGPORT (5432), PGUSER (root), PGBENCH_THREADS (2),
# HOLDFAST_REFERENCE_DIR (the reference's pgbench/ directory, ../shared/reference/pgbench).
set -euo pipefail

clients=64
seconds=10
only=all
while [ $# -gt 0 ]; do
    case "$1" in
        --clients) clients=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "pgbench-ceiling: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$only" in
    all|hot|200-rows) ;;
    *) echo "pgbench-ceiling: --only takes hot or 200-rows, not $only" >&2; exit 2 ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
reference=${HOLDFAST_REFERENCE_DIR:-$here/../../shared/reference/pgbench}
for f in schema.sql hot_cte.sql steady_cart.sql; do
    [ -f "$reference/$f" ] || { echo "pgbench-ceiling: $reference/$f not found (set HOLDFAST_REFERENCE_DIR)" >&2; exit 2; }
done

export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-root}
threads=${PGBENCH_THREADS:-2}
db="hf_pgbench_$(date +%s)_$$"

cleanup() { dropdb --if-exists "$db" >/dev/null 2>&1 || true; }
trap cleanup EXIT
createdb "$db"

# $1: name, $2: reference script, $3: seed statement (the reference README's).
run() {
    local name=$1 script=$2 seed=$3 out tps failed load_before
    PGOPTIONS="-c client_min_messages=warning" psql -q -v ON_ERROR_STOP=1 -d "$db" -f "$reference/schema.sql" >/dev/null
    psql -q -v ON_ERROR_STOP=1 -d "$db" -c "$seed" -c "VACUUM ANALYZE" -c CHECKPOINT >/dev/null
    load_before=$(cut -d' ' -f1-3 /proc/loadavg)
    out=$(pgbench -n -M prepared -c "$clients" -j "$threads" -T "$seconds" -f "$reference/$script" "$db" 2>&1) || {
        echo "$out" >&2
        return 1
    }
    tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | head -1)
    failed=$(echo "$out" | sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p')
    printf '%-10s %8s clients %4s s  tps %10s  failed %s  (%s; load average before: %s)\n' \
        "$name" "$clients" "$seconds" "$tps" "${failed:-0}" "$script" "$load_before"
}

echo "# $(nproc) cores, $(psql -At -d "$db" -c 'SHOW server_version'), pgbench $(pgbench --version | awk '{print $3}'), $threads pgbench threads, scripts from $reference"
if [ "$only" != 200-rows ]; then
    run hot hot_cte.sql "INSERT INTO product VALUES (1, 2000000000, 0)"
fi
if [ "$only" != hot ]; then
    run 200-rows steady_cart.sql "INSERT INTO product SELECT g, 2000000000, 0 FROM generate_series(1, 200) g"
fi
