#!/usr/bin/env bash
# One GPU lease in one command: the self-check, then the quick benchmarks, each under its own
# timeout so that the whole run ends within 9 minutes (a borrowed GPU gives a session 15
# minutes and one command at most 10). selftest.json is rewritten after every check, so a
# self-check stopped by its timeout keeps what it finished; the benchmarks write each suite's
# JSON as it ends. Exit status: the worst of the two.
#
#   bash benchmarks/gpu_run.sh [OUT]      # default OUT: benchmarks/results/<gpu-name>/
#
# Runs from a checkout without installing it (PYTHONPATH), as on a lent machine.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

SELFTEST_S=320  # seconds; + BENCH_S + 2 * GRACE_S <= 540
BENCH_S=180
GRACE_S=10      # after the timeout's SIGTERM, before SIGKILL
out=()
[ $# -ge 1 ] && out=(--out "$1")

run() {  # $1: seconds; the rest: the command
    local limit=$1 started=$SECONDS rc
    shift
    timeout --kill-after="$GRACE_S" "$limit" "$@"
    rc=$?
    [ $rc -eq 124 ] && echo "gpu_run: '$*' stopped by its ${limit} s timeout" >&2
    echo "gpu_run: '$*' exit $rc in $((SECONDS - started)) s" >&2
    return $rc
}

run "$SELFTEST_S" python -m fastgpt selftest "${out[@]}"
selftest_rc=$?
run "$BENCH_S" python -m fastgpt bench --quick "${out[@]}"
bench_rc=$?
exit $(( selftest_rc > bench_rc ? selftest_rc : bench_rc ))
