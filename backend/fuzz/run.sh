#!/usr/bin/env bash
# Runs every sluice fuzz target (or the ones named) for SECONDS each, one
# after another, and prints the executions each ran. Exits non-zero if any
# target crashed (the input is saved under backend/fuzz/artifacts/TARGET/).
#
#   backend/fuzz/run.sh SECONDS [TARGET...]
#
# Environment: FUZZ_MINIMIZE=1 runs `cargo fuzz cmin` on each corpus
# afterwards (keeping one input per covered edge); FUZZ_SANITIZER (default: address) is passed to cargo fuzz
# (`none` is about twice as fast). Inputs start from corpus/TARGET (where
# new finds go) and seeds/TARGET (hand-made, see seeds.py); a dictionary
# dict/TARGET.dict is used when present.
set -euo pipefail

usage() {
    echo "usage: $0 SECONDS [TARGET...]   (SECONDS: how long each target runs)" >&2
    exit 2
}
[[ $# -ge 1 && $1 =~ ^[0-9]+$ && $1 -gt 0 ]] || usage
seconds=$1
shift

fuzz_dir=$(cd "$(dirname "$0")" && pwd)
crate_dir=$(dirname "$fuzz_dir")
cd "$crate_dir"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "$0: the nightly toolchain is missing: rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz (cargo install cargo-fuzz)..." >&2
    cargo install cargo-fuzz
fi

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir "$fuzz_dir")
fi
sanitizer=${FUZZ_SANITIZER:-address}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

cargo +nightly fuzz build --fuzz-dir "$fuzz_dir" -s "$sanitizer"

declare -A execs result
failed=0
for t in "${targets[@]}"; do
    mkdir -p "$fuzz_dir/corpus/$t"
    args=(-max_total_time="$seconds" -print_final_stats=1)
    [[ -f $fuzz_dir/dict/$t.dict ]] && args+=(-dict="$fuzz_dir/dict/$t.dict")
    seeds=()
    [[ -d $fuzz_dir/seeds/$t ]] && seeds=("$fuzz_dir/seeds/$t")
    echo "== $t: ${seconds} s" >&2
    if cargo +nightly fuzz run --fuzz-dir "$fuzz_dir" -s "$sanitizer" "$t" \
        "$fuzz_dir/corpus/$t" "${seeds[@]}" -- "${args[@]}" >"$logs/$t" 2>&1; then
        result[$t]=ok
    else
        result[$t]="CRASH (see $fuzz_dir/artifacts/$t/)"
        failed=1
        tail -n 40 "$logs/$t" >&2
    fi
    execs[$t]=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t" | tail -n 1)
    if [[ ${FUZZ_MINIMIZE:-0} == 1 && ${result[$t]} == ok ]]; then
        # Edges only (no hit counts): every covered edge keeps an input, and
        # the corpus stays a few hundred files.
        cargo +nightly fuzz cmin --fuzz-dir "$fuzz_dir" -s "$sanitizer" "$t" \
            "$fuzz_dir/corpus/$t" -- -use_counters=0 >"$logs/$t.cmin" 2>&1 ||
            { echo "$t: cmin failed:" >&2; tail -n 20 "$logs/$t.cmin" >&2; failed=1; }
    fi
done

printf '\n%-20s %15s  %s\n' target executions result
for t in "${targets[@]}"; do
    printf '%-20s %15s  %s\n' "$t" "${execs[$t]:-?}" "${result[$t]}"
done
exit "$failed"
