#!/usr/bin/env bash
# A real SLURM cluster on this machine for the tests: slurmctld plus one slurmd per virtual node
# (ci-node1, ci-node2, both on 127.0.0.1), no munge, no accounting, no systemd.
#   bash launch/slurm_cluster.sh up DIR     # install slurm if missing, write DIR/slurm.conf, start
#   bash launch/slurm_cluster.sh down DIR   # cancel all jobs, stop the daemons
# Clients need `export SLURM_CONF=DIR/slurm.conf`. Needs root (apt-get, /etc/hosts, SlurmUser=root).
set -euo pipefail
action=${1:?usage: slurm_cluster.sh up|down DIR}
dir=$(realpath -m "${2:?usage: slurm_cluster.sh up|down DIR}")
nodes=(ci-node1 ci-node2)
export SLURM_CONF=$dir/slurm.conf

stop_pidfile() {  # stop the daemon whose pid is in $1, waiting up to 20 s
  [ -f "$1" ] || return 0
  local pid; pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}

case $action in
up)
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client >/dev/null
  fi
  for n in "${nodes[@]}"; do
    grep -qw "$n" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts
  done
  mkdir -p "$dir/state" "$dir/log"
  host=$(hostname -s)
  cat > "$SLURM_CONF" <<CONF
ClusterName=apo-ci
SlurmctldHost=$host
SlurmctldPort=16817
SlurmUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
DependencyParameters=kill_invalid_depend
ReturnToService=2
MinJobAge=3600
KillWait=10
JobRequeue=1
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/state/slurmd.%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.%n.log
NodeName=ci-node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=2 RealMemory=10000 State=UNKNOWN
PartitionName=ci Nodes=ci-node[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
  if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
    echo "slurm daemons are already running here (stop them first): $(pgrep -a -x 'slurmctld|slurmd' | tr '\n' ' ')" >&2
    exit 1
  fi
  slurmctld -c
  for n in "${nodes[@]}"; do slurmd -c -N "$n"; done
  for _ in $(seq 60); do
    if [ "$(sinfo -h -o '%t' 2>/dev/null | grep -c idle || true)" -ge 1 ] && \
       [ "$(sinfo -h -N -o '%t' 2>/dev/null | grep -cE '^idle' || true)" -eq ${#nodes[@]} ]; then
      echo "slurm cluster up: SLURM_CONF=$SLURM_CONF"; exit 0
    fi
    sleep 0.5
  done
  echo "slurm cluster did not come up; logs in $dir/log" >&2; sinfo -N >&2 || true; exit 1
  ;;
down)
  [ -f "$SLURM_CONF" ] || exit 0
  scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
  for _ in $(seq 30); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
  for n in "${nodes[@]}"; do stop_pidfile "$dir/slurmd.$n.pid"; done
  stop_pidfile "$dir/slurmctld.pid"
  echo "slurm cluster down"
  ;;
*) echo "usage: slurm_cluster.sh up|down DIR" >&2; exit 2 ;;
esac
