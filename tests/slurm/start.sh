#!/usr/bin/env bash
# Bring up a real single-node SLURM (munged, slurmctld, slurmd) on this machine for tests/test_slurm.py.
#
#   tests/slurm/start.sh STATE_DIR      # stop with tests/slurm/stop.sh STATE_DIR
#
# No systemd is assumed: the daemons are started by hand and their pid files live in STATE_DIR.
# The node has CPUs=2, RealMemory=20000 and one fake GPU (gres gpu backed by /dev/null) so that
# `sbatch --gpus=1` is accepted. Partitions `cpu` (default) and `gpu`, as in profiles/slurm. No accounting database: `squeue` is the only status source.
# Exit 77 = this machine cannot host it (not root, binaries missing, a foreign slurm.conf): skip.
set -euo pipefail
STATE=${1:?usage: start.sh STATE_DIR}
CONF=/etc/slurm/slurm.conf
GRES=/etc/slurm/gres.conf
MARK="# written by e2epath tests/slurm/start.sh"

skip() { echo "SKIP: $*" >&2; exit 77; }
[ "$(id -u)" = 0 ] || skip "needs root to start slurmctld/slurmd/munged"
for bin in munged slurmctld slurmd sbatch squeue scontrol sinfo; do
  command -v "$bin" >/dev/null 2>&1 || skip "$bin not installed (apt-get install slurmctld slurmd munge slurm-client slurm-wlm-basic-plugins)"
done
# The jobstep plugin drops SLURM_CONF, so the config must sit at the default path; never clobber
# a real cluster's config.
for f in "$CONF" "$GRES"; do
  if [ -e "$f" ] && ! grep -qF "$MARK" "$f"; then skip "$f exists and was not written by this script"; fi
done
if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
  skip "a slurmctld/slurmd is already running on this machine"
fi

STATE=$(mkdir -p "$STATE" && cd "$STATE" && pwd)
mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm
NODE=$(hostname -s)

# munge: reuse a running munged (e.g. a real install), else start our own as user munge.
if ! munge -n </dev/null >/dev/null 2>&1; then
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
                                   chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 755 /run/munge
  runuser -u munge -- munged --force
  cp /run/munge/munged.pid "$STATE/munged.pid"   # ours to stop
  for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
fi

cat > "$CONF" <<CONF
$MARK (state in $STATE)
ClusterName=e2epath-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default every job would take the whole node's memory.
DefMemPerCPU=1000
# squeue must still list finished jobs when the executor polls (its threshold: 3x first poll).
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=2 RealMemory=20000 Gres=gpu:1 State=UNKNOWN
# Named like profiles/slurm's defaults, so the test uses that profile unchanged.
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
CONF
cat > "$GRES" <<CONF
$MARK (state in $STATE)
NodeName=$NODE Name=gpu Count=1 File=/dev/null
CONF

slurmctld -c
slurmd
# Ready when the node is idle in the default partition.
for _ in $(seq 60); do
  state=$(sinfo -h -N -o %T 2>/dev/null | head -1 || true)
  [ "$state" = idle ] && { echo "SLURM up: node $NODE idle (state in $STATE)"; exit 0; }
  sleep 0.5
done
echo "SLURM did not come up (node state: '${state:-none}'); logs:" >&2
tail -20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
exit 1
