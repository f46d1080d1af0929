#!/usr/bin/env bash
# Start a throw-away single-node SLURM cluster on this machine (root, no systemd): the target of
# tests/test_slurm.py. Adapted from a measured recipe; every line exists because something broke without it.
# Needs: apt-get install --no-install-recommends slurmctld slurmd slurm-client munge
# Env: FAKE_GPUS (default 2) fake gres GPUs so GPU requests are really scheduled; PARTITION (default debug).
set -euo pipefail
T0=$(date +%s%N)
HERE=$(cd "$(dirname "$0")" && pwd)
[ "$(id -u)" = 0 ] || { echo "start-slurm.sh: must run as root" >&2; exit 2; }
for bin in slurmctld slurmd sbatch munged; do
  command -v "$bin" >/dev/null || [ -x "/usr/sbin/$bin" ] || { echo "start-slurm.sh: $bin not installed" >&2; exit 2; }
done
"$HERE/stop-slurm.sh" >/dev/null 2>&1 || true   # idempotent: a leftover cluster never breaks the next start
HOST=$(hostname -s)
NODELINE=$(slurmd -C | head -1)                  # CPUs/sockets/cores/memory exactly as slurmd sees them
NGPU=${FAKE_GPUS:-2}
PARTITION=${PARTITION:-debug}

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
chown slurm:slurm /var/spool/slurmctld /var/log/slurm

cat > /etc/slurm/slurm.conf <<CONF
# written by robustgen cluster/start-slurm.sh: a single-node test cluster
ClusterName=robustgen-ci
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# no slurmdbd: sacct does not work, so the Snakemake profile polls squeue (slurm-status-command)
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# squeue must still see finished jobs when Snakemake polls (>= 3x its first status delay)
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
GresTypes=gpu
${NODELINE} NodeAddr=127.0.0.1 Gres=gpu:${NGPU} State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

# slurm rejects a repeated device file, so one null-like char device per fake GPU
: > /etc/slurm/gres.conf
for i in $(seq 0 $((NGPU - 1))); do
  [ -e /dev/fakegpu$i ] || mknod -m 666 /dev/fakegpu$i c 1 3
  echo "NodeName=${HOST} Name=gpu File=/dev/fakegpu$i" >> /etc/slurm/gres.conf
done
rm -f /etc/slurm/cgroup.conf   # 22.05 has no CgroupPlugin=disabled; autodetect works

if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
mkdir -p /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
runuser -u munge -- /usr/sbin/munged --force </dev/null >/dev/null 2>&1   # --force: stale socket is fine
for _ in $(seq 1 40); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
munge -n | unmunge >/dev/null

slurmctld -c </dev/null >/dev/null 2>&1   # -c: clear saved state, a fresh cluster every time
slurmd </dev/null >/dev/null 2>&1         # daemons never hold the caller's stdout
for _ in $(seq 1 120); do
  sinfo -h -N -o '%T' 2>/dev/null | grep -qx idle && break
  sleep 0.5
done
sinfo -N -o '%N %P %T %c %m %G'
srun -t 1 true   # end to end: controller + slurmd + munge
echo "slurm up in $(( ($(date +%s%N) - T0) / 1000000 )) ms"
