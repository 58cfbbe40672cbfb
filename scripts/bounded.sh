#!/usr/bin/env bash
# bounded.sh SECONDS COMMAND...: run COMMAND as make test runs each test pass.
#   - In a process group of its own (timeout(1) makes one), so that no signal the pass's processes send to their
#     group (pyspark's worker daemon and torch's elastic agent signal theirs) reaches make or another pass.
#   - For at most SECONDS: then SIGINT (pytest prints where it stood and its summary), and SIGKILL 60 s later.
#   - Ctrl-C (SIGINT), SIGTERM and SIGHUP sent to this script reach the whole pass: a group of its own no longer gets
#     the terminal's signals, so they are handed on (timeout sends what it gets to its group).
# Exits with COMMAND's status; 124 where it ran out of time.
set -u
seconds=$1
shift
timeout --signal=INT --kill-after=60 "$seconds" "$@" &
pass=$!
trap 'kill -s INT "$pass" 2>/dev/null' INT
trap 'kill -s TERM "$pass" 2>/dev/null' TERM HUP
while true; do
  wait "$pass"
  status=$?
  # Above 128 with the pass still there: wait returned for a signal handed on, and the pass is still ending.
  if [ "$status" -le 128 ] || ! kill -0 "$pass" 2>/dev/null; then
    exit "$status"
  fi
done
