#!/usr/bin/env bash
# Multi-host training without a scheduler: one JAX process per host, all devices of the host each.
#
# On each of N hosts (the same command, with I = 0 .. N-1; HOST:PORT is host 0's address):
#   launch/multihost.sh --coordinator=HOST:PORT --num_processes=N --process_id=I -- \
#       --config=configs/cifar10_110_a48.py --workdir=/shared/runs/c10
# On this machine, N processes on the CPU (a test of the multi-host path; no cluster needed):
#   launch/multihost.sh --local 2 -- --config=configs/fashion_mnist_demo.py --workdir=runs/demo_2proc
#
# Everything after `--` goes to `python -m pyramidnet_jax.main` unchanged.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<EOF
usage: launch/multihost.sh --coordinator=HOST:PORT --num_processes=N --process_id=I -- MAIN_ARGS...
       launch/multihost.sh --local N [--devices_per_process=K] -- MAIN_ARGS...

Runs \`python -m pyramidnet_jax.main MAIN_ARGS...\` as one process of a multi-process JAX job.

Per host (run the same command on every host, process_id 0 .. N-1; HOST:PORT is an address of
the host with process_id 0 that the others can reach, on a free port):
  --coordinator=HOST:PORT   passed on as --coordinator_address
  --num_processes=N         the number of hosts (processes) in the job
  --process_id=I            this host's index, 0 .. N-1
Local (N processes on this machine, on the CPU unless JAX_PLATFORMS is set; coordinator on
127.0.0.1 at a free port; waits for all and fails, stopping the rest, as soon as one fails):
  --local N                 the number of processes
  --devices_per_process=K   K CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count=K)
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

if [[ -n "${PYTHON:-}" ]]; then
  python="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  python="$ROOT/.venv/bin/python"
else
  python=python3
fi
# `-m pyramidnet_jax.main` and the configs' `from configs import default` work from any directory.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ -z "$local_n" ]]; then
  [[ -n "$coordinator$num_processes$process_id" ]] || die 'give --coordinator, --num_processes and --process_id, or --local N'
  [[ -n "$coordinator" && -n "$num_processes" && -n "$process_id" ]] \
    || die '--coordinator, --num_processes and --process_id go together'
  [[ "$coordinator" =~ ^[^:]+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT, got '$coordinator'"
  is_count "$num_processes" || die "--num_processes must be a positive integer, got '$num_processes'"
  [[ "$process_id" =~ ^[0-9]+$ ]] && ((process_id < num_processes)) \
    || die "--process_id must be in 0 .. $((num_processes - 1)), got '$process_id'"
  [[ -z "$devices_per_process" ]] || die '--devices_per_process goes with --local'
  exec "$python" -m pyramidnet_jax.main --coordinator_address="$coordinator" \
    --num_processes="$num_processes" --process_id="$process_id" "$@"
fi

[[ -z "$coordinator$num_processes$process_id" ]] \
  || die '--local chooses the coordinator and process ids itself: drop --coordinator, --num_processes and --process_id'
is_count "$local_n" || die "--local needs a positive number of processes, got '$local_n'"
[[ -z "$devices_per_process" ]] || is_count "$devices_per_process" \
  || die "--devices_per_process must be a positive integer, got '$devices_per_process'"

# A port that is free now (the coordinator, process 0, binds it a moment later).
port_python=python3
command -v python3 >/dev/null || port_python="$python"
port="$("$port_python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
if [[ -n "$devices_per_process" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices_per_process"
fi
echo "launch/multihost.sh: $local_n processes, coordinator 127.0.0.1:$port, JAX_PLATFORMS=$JAX_PLATFORMS" >&2

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
       --num_processes="$local_n" --process_id="$i" "$@")
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
