#!/usr/bin/env bash
# The `loadgen users` figures of docs/load.md, production shape: PostgreSQL, the Redis gate,
# a pool of 16, reservation TTL 15 s. Four runs, each on a fresh database:
#   idle     every shopper connected and idle: the server's memory per keep-alive connection
#   one      N shoppers against one instance
#   two      N shoppers round-robin over two instances on one database
#   kill     as `two`, one instance killed half-way through (its shoppers move to the other)
# Every run ends with the audit, then what the run cost: the CPU seconds of each server and of
# the PostgreSQL sessions serving the run's database (read from /proc before the servers stop),
# and that database's own statistics (transactions, rows, function calls). Only loopback
# addresses are used.
#
# Usage: scripts/users-figures.sh [--shoppers 8000] [--duration 60s] [--runs "idle one two kill"]
#                                 [--port-base PORT]   (instances on PORT, PORT+1; default: free ports)
# Needs: a release build, PostgreSQL on 127.0.0.1:5432 (createdb, dropdb), Redis on
# 127.0.0.1:6379, and an open-file limit above the shoppers for this shell (the script raises
# the soft limit to the hard one; see docs/load.md to raise the hard one).
set -euo pipefail
cd "$(dirname "$0")/.."

shoppers=8000
duration=60s
runs="idle one two kill"
port_base=
while [ $# -gt 0 ]; do
    case "$1" in
        --shoppers) shoppers=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --port-base) port_base=$2; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "users-figures: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

ulimit -n "$(ulimit -Hn)"
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-root}
hf=${HOLDFAST_BIN:-${CARGO_TARGET_DIR:-target}/release/holdfast}
[ -x "$hf" ] || { echo "users-figures: build first: cargo build --release" >&2; exit 2; }
work=$(mktemp -d)
servers=()
db=

cleanup() {
    [ -n "${sampler:-}" ] && kill "$sampler" 2>/dev/null
    for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "$db" ] && dropdb --if-exists "$db" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    if [ -n "$port_base" ]; then
        echo $((port_base + ${#servers[@]}))
    else
        python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
    fi
}
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
# CPU seconds (user + system) a process has used so far; empty once it is gone.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.1f", ($14 + $15) / hz }' "/proc/$1/stat" 2>/dev/null || true; }

# What the database's sessions were doing, sampled every 0.5 s while the shoppers run: busy
# (on CPU or reading), waiting for a lock (and which), idle in a transaction, idle.
sampler=
sample_activity() {
    (
        while :; do
            psql -d "$db" -Atc "SELECT CASE WHEN state = 'active' THEN 'active, ' || coalesce(wait_event_type || ':' || wait_event, 'running') ELSE state END \
                FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'" \
                >>"$work/activity.log" 2>/dev/null || true
            sleep 0.5
        done
    ) &
    sampler=$!
}
activity() {
    [ -n "$sampler" ] && kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
    sampler=
    [ -s "$work/activity.log" ] || return 0
    echo "database sessions sampled every 0.5 s (session-samples by what they were doing):"
    sort "$work/activity.log" | uniq -c | sort -rn | head -8 | sed 's/^/    /'
    rm -f "$work/activity.log"
}

# What the run cost, read while its servers still run: CPU of each server and of the
# PostgreSQL sessions connected to the run's database, then the database's own counters.
costs() {
    local pid backends=0 b c
    for pid in "${servers[@]}"; do
        c=$(cpu_s "$pid")
        echo "server $pid CPU: ${c:-gone} s"
    done
    for b in $(psql -d "$db" -Atc "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"); do
        c=$(cpu_s "$b")
        [ -n "$c" ] && backends=$(awk -v a="$backends" -v b="$c" 'BEGIN { print a + b }')
    done
    echo "PostgreSQL sessions of this database CPU: $backends s (sessions still open at the end)"
    psql -d "$db" -Atc "SELECT 'database: ' || sessions || ' sessions opened, ' || xact_commit || ' commits, ' || xact_rollback || ' rollbacks, ' \
        || tup_returned || ' rows returned, ' || tup_fetched || ' fetched, ' || tup_inserted || ' inserted, ' \
        || tup_updated || ' updated, ' || tup_deleted || ' deleted' FROM pg_stat_database WHERE datname = current_database()"
    psql -d "$db" -Atc "SELECT 'function ' || funcname || ': ' || calls || ' calls, ' || round(self_time::numeric / greatest(calls, 1), 3) || ' ms each' \
        FROM pg_stat_user_functions ORDER BY calls DESC LIMIT 6"
    psql -d "$db" -Atc "SELECT 'table ' || relname || ': ' || coalesce(seq_scan, 0) || ' seq scans, ' || coalesce(idx_scan, 0) || ' index scans, ' \
        || n_tup_ins || ' ins, ' || n_tup_upd || ' upd (' || n_tup_hot_upd || ' hot), ' || n_tup_del || ' del' \
        FROM pg_stat_user_tables WHERE coalesce(seq_scan, 0) + coalesce(idx_scan, 0) + n_tup_ins + n_tup_upd > 0 \
        ORDER BY coalesce(idx_scan, 0) + coalesce(seq_scan, 0) DESC LIMIT 8"
}

flags=()
# Starts one instance on the run's database; sets `target` and appends its pid to `servers`.
start() {
    local port
    port=$(free_port)
    target="http://127.0.0.1:$port"
    "$hf" serve --listen "127.0.0.1:$port" "${flags[@]}" --reservation-ttl-seconds 15 \
        >"$work/server-$port.log" 2>&1 &
    servers+=($!)
    for _ in $(seq 1 100); do
        curl -fs "$target/readyz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "users-figures: the server did not become ready" >&2
    cat "$work/server-$port.log" >&2
    exit 1
}

fresh() {
    for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    servers=()
    [ -n "$db" ] && dropdb --if-exists "$db" >/dev/null 2>&1 || true
    db="hf_users_$(date +%s)_$$"
    createdb "$db"
    # Function calls are counted in this database only (pg_stat_user_functions).
    psql -d "$db" -qc "ALTER DATABASE $db SET track_functions = 'pl'"
    flags=(--database-url "postgres://$PGUSER@$PGHOST:$PGPORT/$db"
        --redis-url "${REDIS_URL:-redis://127.0.0.1:6379}" --redis-key-prefix "$db:"
        --database-max-connections 16 --admin-token "hfa_users_figures_admin_token_0123456789")
}

echo "# $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), ulimit -n $(ulimit -n)"
for run in $runs; do
    fresh
    echo
    echo "## $run"
    case "$run" in
        idle)
            start
            before=$(rss_kb "${servers[0]}")
            "$hf" loadgen users --shoppers "$shoppers" --duration 15s --think-min 60s --think-max 60s \
                --target "$target" "${flags[@]}" --server-pid "${servers[0]}" \
                >"$work/idle.txt" 2>"$work/progress.log" &
            lg=$!
            # Connections are open once the progress line starts (setup done).
            for _ in $(seq 1 600); do grep -q connections "$work/progress.log" 2>/dev/null && break; sleep 0.5; done
            sleep 5
            during=$(rss_kb "${servers[0]}")
            open=$(ls "/proc/${servers[0]}/fd" | wc -l)
            wait "$lg" || true
            echo "server RSS before the shoppers: $((before / 1024)) MB; with $shoppers idle keep-alive connections ($open fds): $((during / 1024)) MB"
            echo "per connection: $(( (during - before) * 1024 / shoppers )) bytes (includes the shoppers' customers cached by token)"
            ;;
        one)
            start
            sample_activity
            "$hf" loadgen users --shoppers "$shoppers" --duration "$duration" \
                --target "$target" "${flags[@]}" --server-pid "${servers[0]}" 2>"$work/progress-one.log" \
                || { tail -n 20 "$work/progress-one.log"; echo "users-figures: the load generator failed" >&2; }
            awk '/^\[/ && ++n % 10 == 0' "$work/progress-one.log"
            ;;
        two|kill)
            start; a=$target
            start; b=$target
            pids="${servers[0]},${servers[1]}"
            if [ "$run" = kill ]; then
                half=$(( ${duration%s} / 2 ))
                victim=${servers[1]}
                (
                    # A starved progress printer may skip a second: wait for any line at or past it.
                    until awk -v h="$half" -F'[[s]' '/^\[/ { if ($2 + 0 >= h) f = 1 } END { exit !f }' \
                        "$work/progress-$run.log" 2>/dev/null; do sleep 0.2; done
                    kill -9 "$victim"
                    echo "killed instance $b at ${half} s" >>"$work/progress-$run.log"
                ) &
            fi
            sample_activity
            "$hf" loadgen users --shoppers "$shoppers" --duration "$duration" \
                --targets "$a,$b" --target "$a" "${flags[@]}" --server-pid "$pids" \
                2>>"$work/progress-$run.log" \
                || { grep -v '^\[' "$work/progress-$run.log" | tail -n 5; echo "users-figures: the load generator failed" >&2; }
            grep -h killed "$work/progress-$run.log" || true
            awk '/^\[/ && ++n % 10 == 0' "$work/progress-$run.log"
            ;;
    esac
    [ "$run" = idle ] || { activity; costs; }
    echo "### server log lines: $(cat "$work"/server-*.log | wc -l); warnings and errors:"
    grep -hE "WARN|ERROR" "$work"/server-*.log | cut -c1-220 | sort | uniq -c | sort -rn | head -5 || true
    rm -f "$work"/server-*.log
done
