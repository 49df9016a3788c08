#!/usr/bin/env bash
# Run the GUI tests N times in a row (default 10) with a CPU hog on every core beside them.
# Prints one line per round and a closing "N passed, M failed" line; exits non-zero on a failure.
# Usage: bash scripts/stress_gui.sh [ROUNDS] [extra pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-10}"; shift || true
py="${PYTHON:-.venv/bin/python}"   # PYTHON=... to use another interpreter
hogs=()
for _ in $(seq "$(nproc)"); do "$py" -c "while True: pass" & hogs+=($!); done
trap 'kill "${hogs[@]}" 2>/dev/null' EXIT
passed=0; failed=0
for r in $(seq "$rounds"); do
    start=$(date +%s)
    if "$py" -m pytest -q -p no:cacheprovider -m gui "$@" >"/tmp/stress_gui_$r.log" 2>&1; then
        passed=$((passed + 1)); verdict=ok
    else
        failed=$((failed + 1)); verdict="FAILED (see /tmp/stress_gui_$r.log)"
    fi
    echo "round $r: $verdict, $(( $(date +%s) - start )) s: $(tail -1 "/tmp/stress_gui_$r.log")"
done
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
