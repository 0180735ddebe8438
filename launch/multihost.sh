#!/usr/bin/env bash
# Multi-host training. Layout: ONE JAX PROCESS PER HOST, WHICH DRIVES EVERY GPU (or TPU chip) OF
# ITS HOST; with --devices_per_process=K the program stops before training unless JAX sees K*N
# devices over the N processes.
#
# On each of N hosts (the same command, with I = 0 .. N-1; HOST:PORT is host 0's address):
#   launch/multihost.sh --coordinator=HOST:PORT --num_processes=N --process_id=I --devices_per_process=8 -- \
#       --config=configs/cifar10_110_a48.py --workdir=/shared/runs/c10
# Inside a SLURM allocation (salloc --nodes=N --gpus-per-node=8), one task per node; the tasks
# find each other through SLURM and the job's GPU count is checked from SLURM's variables:
#   srun --ntasks-per-node=1 launch/multihost.sh -- --config=configs/cifar10_110_a48.py --workdir=/shared/runs/c10
# On this machine, N processes on the CPU (a test of the multi-host path; no cluster needed):
#   launch/multihost.sh --local 2 -- --config=configs/fashion_mnist_demo.py --workdir=runs/demo_2proc
#
# Everything after `--` goes to `python -m pyramidnet_jax.main` unchanged.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<EOF
usage: launch/multihost.sh --coordinator=HOST:PORT --num_processes=N --process_id=I [--devices_per_process=K] -- MAIN_ARGS...
       launch/multihost.sh --local N [--devices_per_process=K] -- MAIN_ARGS...
       srun --ntasks-per-node=1 launch/multihost.sh [--devices_per_process=K] -- MAIN_ARGS...  (SLURM)

Runs \`python -m pyramidnet_jax.main MAIN_ARGS...\` as one process of a multi-process JAX job.

Per host (run the same command on every host, process_id 0 .. N-1; HOST:PORT is an address of
the host with process_id 0 that the others can reach, on a free port):
  --coordinator=HOST:PORT   passed on as --coordinator_address
  --num_processes=N         the number of hosts (processes) in the job
  --process_id=I            this host's index, 0 .. N-1
  --devices_per_process=K   the GPUs (TPU chips) of each host: passes --expected_devices=K*N,
                            and the program stops with one error line unless JAX sees exactly
                            that many devices over all processes
Each process drives every GPU it sees, also inside a SLURM allocation (where JAX on its own
would give it only the GPU of its SLURM_LOCALID).
In a SLURM job step or an Open MPI job (srun or mpirun, no flags): the processes find each other
through the scheduler, each drives all the GPUs of its node (one task per node), and the program
stops with one error line if JAX sees another number of GPUs than the job asked for (SLURM's
variables; with --devices_per_process=K also K x the number of tasks).
Local (N processes on this machine, on the CPU unless JAX_PLATFORMS is set; coordinator on
127.0.0.1 at a free port; waits for all and fails, stopping the rest, as soon as one fails):
  --local N                 the number of processes
  --devices_per_process=K   K CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count=K),
                            checked as above
Environment: PYTHON (default: the repository's .venv/bin/python if present, else python3).
The workdir must be one directory that every process sees (a shared filesystem across hosts).

Example: launch/multihost.sh --local 2 -- --config=configs/fashion_mnist_demo.py --workdir=runs/demo_2proc
EOF
}

die() {
  { echo "launch/multihost.sh: error: $*"; usage | sed -n '1,2p'; echo 'Run launch/multihost.sh -h for details.'; } >&2
  exit 2
}

is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

coordinator='' num_processes='' process_id='' local_n='' devices_per_process=''
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --coordinator=*|--coordinator_address=*) coordinator="${1#*=}" ;;
    --num_processes=*) num_processes="${1#*=}" ;;
    --process_id=*) process_id="${1#*=}" ;;
    --local=*) local_n="${1#*=}" ;;
    --local) (($# > 1)) || die '--local needs a number of processes'; local_n="$2"; shift ;;
    --devices_per_process=*) devices_per_process="${1#*=}" ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (the training arguments go after --)" ;;
  esac
  shift
done
(($#)) || die 'no training arguments: give them after --, e.g. -- --config=configs/fashion_mnist_demo.py --workdir=runs/x'
[[ -z "$devices_per_process" ]] || is_count "$devices_per_process" \
  || die "--devices_per_process must be a positive integer, got '$devices_per_process'"
# main's --expected_devices for N processes: the device count asked for, checked by the program.
expected=()
expect() { [[ -z "$devices_per_process" ]] || expected=("--expected_devices=$((devices_per_process * $1))"); }

if [[ -n "${PYTHON:-}" ]]; then
  python="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  python="$ROOT/.venv/bin/python"
else
  python=python3
fi
# `-m pyramidnet_jax.main` and the configs' `from configs import default` work from any directory.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

in_scheduler_step() {  # srun (SLURM_STEP_ID, not the batch script's) or mpirun
  [[ -n "${OMPI_MCA_orte_hnp_uri:-}" ]] \
    || [[ -n "${SLURM_PROCID:-}" && "${SLURM_STEP_ID:-}" =~ ^[0-9]+$ && ${#SLURM_STEP_ID} -lt 10 ]]
}
if [[ -z "$local_n$coordinator$num_processes$process_id" ]] && in_scheduler_step; then
  ((${SLURM_PROCID:-${OMPI_COMM_WORLD_RANK:-0}} > 0)) \
    || echo "launch/multihost.sh: ${SLURM_NTASKS:-${OMPI_COMM_WORLD_SIZE:-?}} processes from the scheduler; they find each other by themselves" >&2
  tasks="${SLURM_NTASKS:-${OMPI_COMM_WORLD_SIZE:-1}}"
  is_count "$tasks" || die "the scheduler's task count is not a number: '$tasks'"
  expect "$tasks"
  exec "$python" -m pyramidnet_jax.main ${expected[@]+"${expected[@]}"} "$@"
fi

if [[ -z "$local_n" ]]; then
  [[ -n "$coordinator$num_processes$process_id" ]] || die 'give --coordinator, --num_processes and --process_id, or --local N (or start it with srun or mpirun)'
  [[ -n "$coordinator" && -n "$num_processes" && -n "$process_id" ]] \
    || die '--coordinator, --num_processes and --process_id go together'
  [[ "$coordinator" =~ ^[^:]+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT, got '$coordinator'"
  is_count "$num_processes" || die "--num_processes must be a positive integer, got '$num_processes'"
  # shellcheck disable=SC2015  # die exits: no fall-through.
  [[ "$process_id" =~ ^[0-9]+$ ]] && ((process_id < num_processes)) \
    || die "--process_id must be in 0 .. $((num_processes - 1)), got '$process_id'"
  expect "$num_processes"
  exec "$python" -m pyramidnet_jax.main --coordinator_address="$coordinator" \
    --num_processes="$num_processes" --process_id="$process_id" ${expected[@]+"${expected[@]}"} "$@"
fi

[[ -z "$coordinator$num_processes$process_id" ]] \
  || die '--local chooses the coordinator and process ids itself: drop --coordinator, --num_processes and --process_id'
is_count "$local_n" || die "--local needs a positive number of processes, got '$local_n'"

# A port that is free now (the coordinator, process 0, binds it a moment later).
port_python=python3
command -v python3 >/dev/null || port_python="$python"
port="$("$port_python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
if [[ -n "$devices_per_process" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices_per_process"
fi
echo "launch/multihost.sh: $local_n processes, coordinator 127.0.0.1:$port, JAX_PLATFORMS=$JAX_PLATFORMS" >&2

expect "$local_n"
pids=()
stop_all() {
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < local_n; i++)); do
  cmd=("$python" -m pyramidnet_jax.main --coordinator_address="127.0.0.1:$port"
       --num_processes="$local_n" --process_id="$i"
       ${expected[@]+"${expected[@]}"} "$@")
  if ((i == 0)); then
    "${cmd[@]}" &
  else  # The other processes' lines are prefixed with their id.
    "${cmd[@]}" > >(sed -u "s/^/[process $i] /") 2>&1 &
  fi
  pids+=("$!")
done

# Poll rather than `wait -n`, which needs bash >= 5.1 to be told which children to wait for.
status=0 running="$local_n"
while ((running > 0)); do
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}"
    [[ -n "$pid" ]] || continue
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" || rc=$?
    pids[i]=''
    running=$((running - 1))
    if ((rc != 0 && status == 0)); then
      status="$rc"
      echo "launch/multihost.sh: process $i failed (exit status $rc); stopping the others" >&2
      stop_all
    fi
  done
  ((running == 0)) || sleep 0.5
done
exit "$status"
