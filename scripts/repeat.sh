#!/usr/bin/env bash
# Run a command N times in a row and count passes and failures, so that a test (or a launch) that
# fails one run in ten shows up as a number instead of a surprise in CI.
#
#   bash scripts/repeat.sh 50                     # every distributed test of tests/test_scale.py, 50 times
#   bash scripts/repeat.sh 20 -- .venv/bin/torchrun --standalone --nproc_per_node 2 train.py ... --max-steps 5
#
# A run fails when the command exits non-zero or its output shows a rank that aborted ("terminate
# called", "SIGABRT", "Signal 6"); the log of every failed run is kept in $REPEAT_LOGS (default
# a fresh directory under /tmp) and named on the summary line. One torch thread per process
# (OMP_NUM_THREADS=1 unless set) keeps two ranks off each other's core.
set -uo pipefail
cd "$(dirname "$0")/.."
n=${1:?"usage: bash scripts/repeat.sh N [-- command ...]"}
shift
if [ "${1:-}" = "--" ]; then
  shift
  cmd=("$@")
else
  cmd=(.venv/bin/python -m pytest -q -p no:cacheprovider tests/test_scale.py
       -k "two_ranks or two_processes or two_process_run")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
logs=${REPEAT_LOGS:-$(mktemp -d /tmp/repeat.XXXXXX)}
mkdir -p "$logs"
pass=0 fail=0 failed=()
for i in $(seq 1 "$n"); do
  log="$logs/run$i.log"
  start=$SECONDS
  "${cmd[@]}" >"$log" 2>&1
  rc=$?
  if [ $rc -eq 0 ] && ! grep -qE "terminate called|SIGABRT|Signal 6" "$log"; then
    pass=$((pass + 1)); rm -f "$log"; what=pass
  else
    fail=$((fail + 1)); failed+=("$i"); what="FAIL (exit $rc, log $log)"
  fi
  echo "run $i/$n: $what ($((SECONDS - start)) s)"
done
echo "passed $pass of $n, failed $fail${failed:+ (runs ${failed[*]}; logs in $logs)}: ${cmd[*]}"
[ $fail -eq 0 ]
