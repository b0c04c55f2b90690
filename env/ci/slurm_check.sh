#!/usr/bin/env bash
# make test-slurm: a real two-node Slurm cluster on this machine, then tests/e2e/slurm/ against it.
#
# Installs Debian's slurm-wlm and munge when missing, then starts, all under one temporary directory:
# munged (its own socket and key), slurmctld, and two slurmd "nodes" n1 and n2 on 127.0.0.1, each on its
# own port (Debian's build allows several slurmd per host), each with one fake GPU GRES backed by a
# character device, so that --gpus-per-node works as on a GPU cluster. Every daemon runs in the
# foreground of a background job and is stopped by its pid on exit; the directory is then removed.
# Needs root (the daemons and the package install). Exit: pytest's code, 2 for a setup failure.
set -euo pipefail
cd "$(dirname "$0")/../.."

say() { printf 'torchrig test-slurm: %s\n' "$*" >&2; }
if [ "$(id -u)" -ne 0 ]; then
    say "needs root: it installs slurm-wlm and munge and runs their daemons (run it as root, as CI does)"
    exit 2
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge (Debian packages)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
fi
# The tests run in .venv, which make test made before this stage; make it when run on its own.
[ -x .venv/bin/python ] || python3 -m env.rig.runtime setup RUNTIME=local
PY=.venv/bin/python

started=$SECONDS
top=$(mktemp -d /tmp/torchrig-slurm.XXXXXX)
pids=()
# shellcheck disable=SC2329  # run by the EXIT trap
stop() {
    local code=$?
    # Jobs first (their steps end with them), then the daemons, newest first, each by its pid.
    if [ -S "$top/munge/munge.socket.2" ] && [ -f "$top/slurm.conf" ]; then
        SLURM_CONF="$top/slurm.conf" scancel --quiet --user=root 2>/dev/null || true
        sleep 1
    fi
    local i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[i]}" 2>/dev/null || true
    done
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        wait "${pids[i]}" 2>/dev/null || true
    done
    # A daemon that outlived the kill of its pid (seen: slurmd with a stuck step) is ended by its paths,
    # which are this run's own temporary directory.
    pkill -KILL -f -- "$top/" 2>/dev/null || true
    if [ "$code" -ne 0 ] && [ -d "$top/log" ]; then
        say "daemon logs (last lines):"
        tail -n 15 "$top"/log/*.log >&2 || true
    fi
    rm -rf "$top"
    exit "$code"
}
trap stop EXIT
trap 'exit 130' INT TERM

free_ports() { "$PY" -c '
import socket, sys
probes = [socket.socket() for _ in range(int(sys.argv[1]))]
for probe in probes:
    probe.bind(("127.0.0.1", 0))
print(" ".join(str(probe.getsockname()[1]) for probe in probes))
' "$1"; }
read -r ctld_port n1_port n2_port < <(free_ports 3)
host=$(hostname -s)

mkdir -p "$top"/{munge,log,state,spool,dev}
chmod 0700 "$top/munge"
# The fake GPUs: character devices with /dev/null's numbers, which is all slurmd's GRES code looks at.
mknod "$top/dev/nvidia0" c 1 3
mknod "$top/dev/nvidia1" c 1 3

# munge: its own key and socket here, so nothing of the machine's (/etc/munge, /run/munge) is used.
dd if=/dev/urandom of="$top/munge/munge.key" bs=1024 count=1 status=none
chmod 0400 "$top/munge/munge.key"
munged --foreground --force --key-file="$top/munge/munge.key" --socket="$top/munge/munge.socket.2" \
    --pid-file="$top/munge/munged.pid" --seed-file="$top/munge/seed" --log-file="$top/log/munged.log" >"$top/log/munged.out" 2>&1 &
pids+=($!)

cat >"$top/slurm.conf" <<EOF
ClusterName=torchrig-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$top/munge/munge.socket.2
StateSaveLocation=$top/state
SlurmdSpoolDir=$top/spool/%n
SlurmctldPidFile=$top/slurmctld.pid
SlurmdPidFile=$top/slurmd-%n.pid
SlurmctldLogFile=$top/log/slurmctld.log
SlurmdLogFile=$top/log/slurmd-%n.log
# linuxproc follows every descendant of a task, so the end of a step ends all its processes.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Pending jobs are looked at every 2 s, not every 60 s: a requeued job starts as soon as it may.
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
GresTypes=gpu
ReturnToService=2
JobRequeue=1
KillWait=10
InactiveLimit=0
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$n1_port CPUs=1 Gres=gpu:1 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$n2_port CPUs=1 Gres=gpu:1 State=UNKNOWN
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
cat >"$top/gres.conf" <<EOF
AutoDetect=off
NodeName=n1 Name=gpu File=$top/dev/nvidia0
NodeName=n2 Name=gpu File=$top/dev/nvidia1
EOF
export SLURM_CONF="$top/slurm.conf"

slurmctld -D -i -f "$SLURM_CONF" >"$top/log/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -N n1 -f "$SLURM_CONF" >"$top/log/n1.out" 2>&1 &
pids+=($!)
slurmd -D -N n2 -f "$SLURM_CONF" >"$top/log/n2.out" 2>&1 &
pids+=($!)

for _ in $(seq 60); do
    if [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" -eq 2 ]; then
        break
    fi
    sleep 0.5
done
if [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" -ne 2 ]; then
    say "the two nodes did not come up idle within 30 s:"
    sinfo -N >&2 || true
    exit 2
fi
say "cluster up in $((SECONDS - started)) s: $(sinfo -h -N -o '%N %T %G' | sort -u | tr '\n' ';')"

# The tests submit with sbatch and read the logs and runs from here; they skip without it.
export TORCHRIG_SLURM_CLUSTER="$top"
set +e
"$PY" -m pytest -q -p no:cacheprovider tests/e2e/slurm "$@"
code=$?
set -e
say "stage took $((SECONDS - started)) s"
exit "$code"
