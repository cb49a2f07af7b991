#!/usr/bin/env bash
# The database's own ceiling for a reservation (DESIGN §10), to read holdfast's figures
# against: pgbench runs the SQL a reservation runs — the guarded UPDATE of the product row and
# the INSERT of the reservation row, in one transaction — on one hot row and spread over 200
# rows, and prints the transactions per second of each.
#
# It works in a scratch database it creates and drops, on the same PostgreSQL as holdfast.
# The stock is set far beyond what a run can take, so the guard never refuses and every
# transaction is a reservation.
#
# Usage: scripts/pgbench-ceiling.sh [--clients N] [--seconds S] [--only hot|200-rows]
# Environment: PGHOST (127.0.0.1), PGPORT (5432), PGUSER (root), PGBENCH_THREADS (nproc).
set -euo pipefail

clients=64
seconds=10
only=all
while [ $# -gt 0 ]; do
    case "$1" in
        --clients) clients=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "pgbench-ceiling: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$only" in
    all|hot|200-rows) ;;
    *) echo "pgbench-ceiling: --only takes hot or 200-rows, not $only" >&2; exit 2 ;;
esac

export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-root}
threads=${PGBENCH_THREADS:-$(nproc)}
db="hf_pgbench_$(date +%s)_$$"
work=$(mktemp -d)

cleanup() {
    dropdb --if-exists "$db" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

createdb "$db"
psql -q -v ON_ERROR_STOP=1 -d "$db" <<'SQL'
-- The columns of holdfast's products and reservations that a reservation touches, with the
-- same check constraint, key and index (migrations/postgres/0001_foundation.sql).
CREATE TABLE products (
    id        BIGINT PRIMARY KEY,
    stock     BIGINT NOT NULL,
    reserved  BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT products_reserved_within_stock CHECK (reserved >= 0 AND reserved <= stock)
);
CREATE TABLE reservations (
    checkout_id  UUID NOT NULL,
    product_id   BIGINT NOT NULL REFERENCES products(id),
    quantity     BIGINT NOT NULL CHECK (quantity > 0),
    status       TEXT NOT NULL,
    PRIMARY KEY (checkout_id, product_id)
);
CREATE INDEX reservations_product_status ON reservations(product_id, status);
SQL

reset_stock() {
    psql -q -v ON_ERROR_STOP=1 -d "$db" <<'SQL'
TRUNCATE reservations;
DELETE FROM products;
-- A billion units a row: no run comes near, so the guard always passes.
INSERT INTO products (id, stock) SELECT g, 1000000000 FROM generate_series(1, 200) AS g;
VACUUM ANALYZE products;
VACUUM ANALYZE reservations;
SQL
}

# $1: name, $2: the \set line choosing the product.
run() {
    local name=$1 choose=$2 script="$work/$1.sql" out
    cat >"$script" <<SQL
$choose
BEGIN;
UPDATE products SET reserved = reserved + 1 WHERE id = :id AND stock - reserved >= 1;
INSERT INTO reservations (checkout_id, product_id, quantity, status)
    VALUES (gen_random_uuid(), :id, 1, 'active');
END;
SQL
    reset_stock
    out=$(pgbench -n -M prepared -c "$clients" -j "$threads" -T "$seconds" -f "$script" "$db" 2>&1) || {
        echo "$out" >&2
        return 1
    }
    local tps failed
    tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | head -1)
    failed=$(echo "$out" | sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p')
    printf '%-10s %8s clients %4s s  tps %10s  failed %s  (load average before: %s)\n' \
        "$name" "$clients" "$seconds" "$tps" "${failed:-0}" "$load_before"
}

echo "# $(nproc) cores, $(psql -At -d "$db" -c 'SHOW server_version'), pgbench $(pgbench --version | awk '{print $3}'), $threads pgbench threads"
if [ "$only" != 200-rows ]; then
    load_before=$(cut -d' ' -f1-3 /proc/loadavg)
    run hot '\set id 1'
fi
if [ "$only" != hot ]; then
    load_before=$(cut -d' ' -f1-3 /proc/loadavg)
    run 200-rows '\set id random(1, 200)'
fi
