#!/usr/bin/env bash
# Stop what tests/slurm/start.sh STATE_DIR started (by the pids in its pid files) and remove its
# config files. Safe to call twice or after a failed start.
set -uo pipefail
STATE=${1:?usage: stop.sh STATE_DIR}
MARK="# written by e2epath tests/slurm/start.sh"

for name in slurmd slurmctld munged; do
  pidfile="$STATE/$name.pid"
  [ -s "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || continue
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
done
# Only the config this STATE_DIR's start.sh wrote (not another test run's).
STATE=$(cd "$STATE" 2>/dev/null && pwd || echo "$STATE")
for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
  if [ -e "$f" ] && grep -qF "$MARK (state in $STATE)" "$f"; then rm -f "$f"; fi
done
exit 0
