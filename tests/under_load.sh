#!/usr/bin/env bash
# The test suite under CPU load: start busy loops (one per core by default), run pytest RUNS
# times (default 3), print each run's time and result, end the busy loops by their pids (also
# on Ctrl-C or an error), and exit non-zero if any run failed.
#
#   tests/under_load.sh                          # the whole suite, 3 times, 2 busy loops
#   RUNS=5 tests/under_load.sh tests/test_slack_approvals.py -k buttons
#   BUSY=4 tests/under_load.sh                   # heavier load
#
# Arguments go to pytest. Each run's output is kept in a log file named in the summary line.
set -uo pipefail
cd "$(dirname "$0")/.."

runs="${RUNS:-3}"
busy="${BUSY:-2}"
pytest="${PYTEST:-.venv/bin/pytest}"
logs="$(mktemp -d "${TMPDIR:-/tmp}/rotor-under-load.XXXXXX")"

loops=()
end_loops() {
  for pid in "${loops[@]}"; do
    kill "$pid" 2>/dev/null
  done
  for pid in "${loops[@]}"; do
    wait "$pid" 2>/dev/null
  done
  loops=()
}
trap end_loops EXIT
trap 'exit 130' INT TERM

for _ in $(seq "$busy"); do
  python3 -c 'while True: pass' &
  loops+=("$!")
done
echo "under load: ${busy} busy loops (pids ${loops[*]}), ${runs} runs of pytest $*; logs in ${logs}"

failed=0
for run in $(seq "$runs"); do
  log="${logs}/run-${run}.log"
  started=$(date +%s)
  if "$pytest" -q -p no:cacheprovider "$@" >"$log" 2>&1; then
    result="passed"
  else
    result="FAILED"
    failed=1
  fi
  seconds=$(($(date +%s) - started))
  echo "run ${run}/${runs}: ${result} in ${seconds}s: $(tail -n 1 "$log") (${log})"
  if [ "$result" = "FAILED" ]; then
    grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /'
  fi
done
exit "$failed"
