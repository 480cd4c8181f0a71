#!/usr/bin/env bash
# QoS, measured: one sluice daemon serving two null-disk exports over
# vhost-user, "limited" (iops = $IOPS, burst 0.1 s) and "free" (no limit),
# driven by sluice-bench (4 KiB random reads at depth $DEPTH, one queue).
# Per round:
#   free alone, limited alone, both at once (the unthrottled one's IOPS
#   next to a throttled neighbour), and a burst: the limit's burst raised to
#   $BURST_S s, the export idle long enough to fill it, then two 1 s runs
#   back to back (the first gets the burst and the rate, the second the rate).
# Prints one markdown row per round and the load average before and after.
#
#   cargo build --release -p sluice -p sluice-bench && bench/qos.sh
#   IOPS=5000 DEPTH=32 RUNTIME=5s ROUNDS=3 BURST_S=2 bench/qos.sh
#
# The server is pinned to CPU 1 and the clients to CPU 0 (taskset), as in
# sluice-compare's split placement.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
SLUICE=${SLUICE:-$here/target/release/sluice}
BENCH=${SLUICE_BENCH:-$here/target/release/sluice-bench}
IOPS=${IOPS:-5000}
DEPTH=${DEPTH:-32}
RUNTIME=${RUNTIME:-5s}
RAMP=${RAMP:-1s}
ROUNDS=${ROUNDS:-3}
BURST_S=${BURST_S:-2}
# FREE_POLL=1: the unthrottled export's client busy-polls its ring
# (sluice-bench --poll), so that its IOPS measure the server rather than the
# wake-ups of an idle client CPU (which a busy neighbour on that CPU makes
# cheaper: without it, "free" measures higher next to the limited client
# than alone). The limited client always sleeps.
FREE_POLL=${FREE_POLL:-1}
# The CPU of the limited export's client (the free one's is always CPU 0).
LIMITED_CPU=${LIMITED_CPU:-0}

for bin in "$SLUICE" "$BENCH"; do
    [[ -x $bin ]] || { echo "qos.sh: $bin missing: cargo build --release -p sluice -p sluice-bench" >&2; exit 1; }
done

dir=$(mktemp -d)
pid=
cleanup() {
    if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$dir"
}
trap cleanup EXIT

cat >"$dir/sluice.toml" <<EOF
[daemon]
control = "$dir/control.sock"

[[disk]]
name = "n1"
path = "null:1G"

[[disk]]
name = "n2"
path = "null:1G"

[[export]]
name = "limited"
disk = "n1"
type = "vhost-user"
socket = "$dir/limited.sock"
[export.qos]
iops = $IOPS
burst_seconds = 0.1

[[export]]
name = "free"
disk = "n2"
type = "vhost-user"
socket = "$dir/free.sock"
EOF

taskset -c 1 "$SLUICE" serve --config "$dir/sluice.toml" >"$dir/out" 2>"$dir/err" &
pid=$!
for _ in $(seq 100); do
    grep -q '"control"' "$dir/out" 2>/dev/null && break
    sleep 0.1
done
grep -q '"control"' "$dir/out" || { echo "qos.sh: sluice did not start:" >&2; cat "$dir/err" >&2; exit 1; }

ctl() { "$SLUICE" ctl --control "$dir/control.sock" "$@" >/dev/null; }

# IOPS of one run on export $1 for $2 after a ramp of $3.
iops() {
    local poll=() cpu=0
    [[ $1 == free && $FREE_POLL == 1 ]] && poll=(--poll)
    [[ $1 == limited ]] && cpu=$LIMITED_CPU
    "$BENCH" --driver vhost-user --path "$dir/$1.sock" --rw randread --bs 4k \
        --iodepth "$DEPTH" --queues 1 --runtime "$2" --ramp "$3" --cpus "$cpu" --json "${poll[@]}" |
        grep -o '"iops": *[0-9.]*' | head -1 | sed 's/.*: *//; s/\..*//'
}

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| round | free alone | limited alone | free, next to limited | limited, next to free | burst: first 1 s | then: next 1 s |"
echo "|---|---|---|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
    free_alone=$(iops free "$RUNTIME" "$RAMP")
    limited_alone=$(iops limited "$RUNTIME" "$RAMP")
    iops free "$RUNTIME" "$RAMP" >"$dir/both-free" &
    a=$!
    iops limited "$RUNTIME" "$RAMP" >"$dir/both-limited" &
    b=$!
    wait $a $b
    ctl qos limited --iops "$IOPS" --burst "$BURST_S"
    # Idle long enough to fill the bucket.
    sleep "$BURST_S"
    sleep 0.5
    burst=$(iops limited 1s 0s)
    then=$(iops limited 1s 0s)
    ctl qos limited --iops "$IOPS" --burst 0.1
    echo "| $round | $free_alone | $limited_alone | $(cat "$dir/both-free") | $(cat "$dir/both-limited") | $burst | $then |"
done
echo
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
