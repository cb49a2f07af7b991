#!/usr/bin/env bash
# The `loadgen users` figures of docs/load.md, production shape: PostgreSQL, the Redis gate,
# a pool of 16, reservation TTL 15 s. Four runs, each on a fresh database:
#   idle     every shopper connected and idle: the server's memory per keep-alive connection
#   one      N shoppers against one instance
#   two      N shoppers round-robin over two instances on one database
#   kill     as `two`, one instance killed half-way through (its shoppers move to the other)
# Every run ends with the audit. Only loopback addresses are used.
#
# Usage: scripts/users-figures.sh [--shoppers 8000] [--duration 60s] [--runs "idle one two kill"]
# Needs: a release build, PostgreSQL on 127.0.0.1:5432 (createdb, dropdb), Redis on
# 127.0.0.1:6379, and an open-file limit above the shoppers for this shell (the script raises
# the soft limit to the hard one; see docs/load.md to raise the hard one).
set -euo pipefail
cd "$(dirname "$0")/.."

shoppers=8000
duration=60s
runs="idle one two kill"
while [ $# -gt 0 ]; do
    case "$1" in
        --shoppers) shoppers=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
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
    for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "$db" ] && dropdb --if-exists "$db" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

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
            "$hf" loadgen users --shoppers "$shoppers" --duration "$duration" \
                --target "$target" "${flags[@]}" --server-pid "${servers[0]}" 2>"$work/progress-one.log"
            tail -n 3 "$work/progress-one.log"
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
            "$hf" loadgen users --shoppers "$shoppers" --duration "$duration" \
                --targets "$a,$b" --target "$a" "${flags[@]}" --server-pid "$pids" \
                2>>"$work/progress-$run.log" || true
            grep -h killed "$work/progress-$run.log" || true
            tail -n 3 "$work/progress-$run.log"
            ;;
    esac
    echo "### server log lines: $(cat "$work"/server-*.log | wc -l); warnings and errors:"
    grep -hE "WARN|ERROR" "$work"/server-*.log | cut -c1-220 | sort | uniq -c | sort -rn | head -5 || true
    rm -f "$work"/server-*.log
done
