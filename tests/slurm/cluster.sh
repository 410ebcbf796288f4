#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests marked `slurm`.
#   tests/slurm/cluster.sh start STATE_DIR   install (Debian packages) if needed, configure, start, wait idle
#   tests/slurm/cluster.sh stop STATE_DIR    stop the daemons by PID
# The config goes to /etc/slurm/slurm.conf, where every SLURM command finds it (the executor plugin drops
# SLURM_* variables, SLURM_CONF included, before its nested srun); an existing slurm.conf that this
# script did not write is never touched. STATE_DIR/jobcomp.log is SLURM's own record of every finished
# job (jobcomp/filetxt). Needs root and apt-get (or slurm-wlm and munge installed).
set -euo pipefail
action=${1:?usage: cluster.sh start|stop STATE_DIR}
state=$(mkdir -p "${2:?usage: cluster.sh start|stop STATE_DIR}" && cd "$2" && pwd)

CONF=/etc/slurm/slurm.conf
MARK="# written by mlsm-pipeline tests/slurm/cluster.sh"

stop() {
    for daemon in slurmd slurmctld munged; do
        if [ -f "$state/$daemon.pid" ]; then
            kill "$(cat "$state/$daemon.pid")" 2>/dev/null || true
            rm -f "$state/$daemon.pid"
        fi
    done
    if [ -f "$CONF" ] && head -n 1 "$CONF" | grep -qxF "$MARK"; then rm -f "$CONF"; fi
}

if [ "$action" = stop ]; then stop; exit 0; fi
[ "$action" = start ] || { echo "unknown action $action" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || { echo "need root and apt-get to install SLURM" >&2; exit 3; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

if [ -f "$CONF" ] && ! head -n 1 "$CONF" | grep -qxF "$MARK"; then
    echo "$CONF exists and was not written by this script: not touching a real cluster's config" >&2
    exit 4
fi

# munge: its own key and socket inside STATE_DIR, so no system service is touched.
mkdir -p "$state/munge" "$state/spool" "$state/ctld"
chmod 700 "$state/munge"
if [ ! -f "$state/munge/munge.key" ]; then
    dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$state/munge/munge.key"
fi
socket="$state/munge/munge.socket"
munged --force --key-file="$state/munge/munge.key" --socket="$socket" \
    --pid-file="$state/munged.pid" --log-file="$state/munged.log" --seed-file="$state/munge/seed"

cpus=$(nproc)
memory=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
mkdir -p "$(dirname "$CONF")"
cat > "$CONF" <<CONF
$MARK
ClusterName=mlsm-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
SlurmctldPort=$(( 16817 + RANDOM % 1000 ))
SlurmdPort=$(( 17818 + RANDOM % 1000 ))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$state/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerParameters=batch_sched_delay=0
SchedulerType=sched/backfill
MinJobAge=600
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
NodeName=localhost CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld -f "$CONF"
slurmd -N localhost -f "$CONF"
for _ in $(seq 60); do
    if sinfo -h -N -o %T 2>/dev/null | grep -qx idle; then
        echo "SLURM cluster up: $(sinfo -h -o '%P %D %c %m')"
        exit 0
    fi
    sleep 1
done
echo "SLURM node did not become idle; logs in $state" >&2
tail -n 20 "$state/slurmctld.log" "$state/slurmd.log" >&2 || true
stop
exit 1
