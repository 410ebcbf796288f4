#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine, for the tests marked `slurm`: node1 and node2, two slurmd
# (Debian's slurm-wlm is built with multiple-slurmd support), each in its own UTS and mount namespace, so that a
# job on it has the node's hostname and resolves both names (a private /etc/hosts: node1 127.0.0.2, node2
# 127.0.0.3, on the loopback). Both nodes declare the machine's CPUs and memory: SLURM's bookkeeping only.
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
    for pidfile in "$state"/slurmd-node*.pid "$state/slurmctld.pid" "$state/munged.pid"; do
        if [ -f "$pidfile" ]; then
            pid=$(cat "$pidfile")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            rm -f "$pidfile"
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

{ echo "127.0.0.1 localhost"; echo "127.0.0.2 node1"; echo "127.0.0.3 node2"; } > "$state/hosts"
slurmd_port=$(( 17818 + RANDOM % 1000 ))
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
AuthInfo=socket=$socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool-%n
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd-%n.log
SlurmctldPort=$(( 16817 + RANDOM % 1000 ))
SlurmdPort=$slurmd_port
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
JobRequeue=1
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.2 Port=$slurmd_port CPUs=$cpus RealMemory=$memory State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.3 Port=$((slurmd_port + 1)) CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld -f "$CONF"
for node in node1 node2; do
    unshare --uts --mount --propagation private sh -c \
        "mount --bind '$state/hosts' /etc/hosts && hostname $node && exec slurmd -N $node -f '$CONF'"
done
for _ in $(seq 60); do
    if [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cx idle)" = 2 ]; then
        echo "SLURM cluster up: $(sinfo -h -o '%P %D %c %m')"
        exit 0
    fi
    sleep 1
done
echo "SLURM nodes did not become idle; logs in $state" >&2
tail -n 20 "$state/slurmctld.log" "$state"/slurmd-node*.log >&2 || true
stop
exit 1
