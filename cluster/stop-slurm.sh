#!/usr/bin/env bash
# Stop the cluster started by start-slurm.sh: cancel jobs, shut daemons down, wait, hard-kill stragglers.
# Safe to call when nothing runs (tests call it in teardown whatever happened).
set -u
T0=$(date +%s%N)
if [ -f /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null; then
  scancel --user="$(id -un)" --quiet 2>/dev/null || true
  scontrol shutdown >/dev/null 2>&1 || true   # stops slurmctld and every slurmd
fi
for _ in $(seq 1 40); do
  alive=0
  for f in /run/slurmctld.pid /run/slurmd.pid; do
    [ -f $f ] && kill -0 "$(cat $f)" 2>/dev/null && alive=1
  done
  [ $alive = 0 ] && break
  sleep 0.5
done
for f in /run/slurmctld.pid /run/slurmd.pid; do
  [ -f $f ] && kill -0 "$(cat $f)" 2>/dev/null && kill -9 "$(cat $f)"
  rm -f $f
done
# job steps and daemons whose pid files are gone (e.g. after a timed-out test) still hold the node
for name in slurmstepd slurmd slurmctld; do
  pkill -9 -x "$name" 2>/dev/null || true
done
if [ -f /run/munge/munged.pid ]; then
  MPID=$(cat /run/munge/munged.pid)
  kill "$MPID" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$MPID" 2>/dev/null || break; sleep 0.25; done   # a restart races the old munged
  rm -f /run/munge/munged.pid
fi
echo "slurm stopped in $(( ($(date +%s%N) - T0) / 1000000 )) ms"
