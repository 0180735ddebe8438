#!/usr/bin/env bash
# Does this GPU install work, and how fast is it? One script, at most 10 minutes on one GPU
# (H100/H200 class), writing one JSON:
#   launch/accelerator_check.sh                        # -> accelerator_check.json
#   launch/accelerator_check.sh --data-dir=DIR out.json
#   launch/accelerator_check.sh --wheels=wheels/          # install offline first (see -h)
#   launch/accelerator_check.sh --dry-run              # print the steps, run nothing
#   launch/accelerator_check.sh --cpu-smoke            # every step in miniature, on the CPU
# Each step runs under its own `timeout`; a failed step is recorded and the next one runs.
# launch/accelerator_check.py assembles the JSON (docs/benchmarks.md#gpu-method-and-command
# describes it).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

usage() {
  cat <<EOF
usage: launch/accelerator_check.sh [--dry-run] [--cpu-smoke] [--data-dir=DIR] [--wheels=DIR]
                                   [--workdir=DIR] [OUTPUT.json]

Checks a GPU install of pyramidnet_jax and measures it, writing OUTPUT.json (default
accelerator_check.json; rewritten after every step). The steps, each under its own timeout
(they add up to under 10 minutes; the install, with --wheels only, comes on top):
  install        with --wheels=DIR only: pip install --no-index --find-links=DIR
                 -r requirements.txt -e '.[cuda12]' (into .venv, made if missing, or PYTHON's)
  devices        jax.devices(): platform, device kind, memory; package versions
  demo           the Fashion-MNIST demo in bfloat16 to >= 90% test accuracy (accuracy, wall time,
                 steps/s)
  resume         the demo killed (SIGKILL) after its first checkpoint and rerun to the end, against
                 an uninterrupted run: bit-identical with XLA_FLAGS=--xla_gpu_deterministic_ops=true
                 (checked), and with the default flags (recorded)
  bench_*        python -m pyramidnet_jax.benchmark, bfloat16, for PyramidNet-110 a48 and 272 a200:
                 ours, PyTorch eager channels_last, then torch.compile channels_last (bf16 autocast)
  remat_272_a200 the 272 a200 benchmark with --config.model.remat=true (peak device memory)
  pipeline       python -m pyramidnet_jax.pipeline_benchmark: the input pipeline's images/s

Options:
  --dry-run      print the steps and their commands and timeouts; run nothing
  --cpu-smoke    every step in miniature on the CPU (tiny networks and step counts): checks the
                 script and the JSON, not a GPU
  --data-dir=DIR the four Fashion-MNIST .gz files (as FASHION_MNIST_DIR; default
                 /usr/share/datasets/fashion-mnist, from Debian's dataset-fashion-mnist)
  --wheels=DIR   install from this folder of wheels first, with no network (a machine without
                 internet). Fill it on a machine with internet, the same Python version and
                 platform (x86-64 Linux):
                   pip download -d wheels -r requirements.txt 'jax-cuda12-plugin[with-cuda]==0.10.2' \
                       'setuptools>=64' wheel
                 and copy wheels/ (about 6 GB: CUDA libraries for JAX and for PyTorch) and the
                 Fashion-MNIST files (or Debian's dataset-fashion-mnist package) with the checkout
  --workdir=DIR  where the runs, logs and caches go (new or empty; default a new directory under
                 \${TMPDIR:-/tmp}); kept afterwards, named in the JSON
Environment: PYTHON (default: the checkout's .venv/bin/python if present, else python3), an
environment where pyramidnet_jax's requirements import (torch optional: without it the PyTorch
variants are skipped; a PyTorch without CUDA on a GPU machine is reported as an error, since its
figures would be the CPU's); TIMEOUT_SCALE (default 1) multiplies every timeout, for slower cards.
EOF
}

die() {
  echo "launch/accelerator_check.sh: error: $*" >&2
  echo 'Run launch/accelerator_check.sh -h for details.' >&2
  exit 2
}

dry_run=0 smoke=0 output='' scratch='' wheels=''
data_dir="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --cpu-smoke) smoke=1 ;;
    --data-dir=*|--data=*) data_dir="${1#*=}" ;;
    --wheels=*) wheels="${1#*=}" ;;
    --workdir=*) scratch="${1#*=}" ;;
    --output=*) output="${1#*=}" ;;
    --data-dir|--data|--wheels|--workdir|--output)
      (($# >= 2)) || die "$1 needs a value"
      set -- "$1=$2" "${@:3}"
      continue ;;
    -*) die "unknown option '$1'" ;;
    *) [[ -z "$output" ]] || die "one output file only (got '$output' and '$1')"; output="$1" ;;
  esac
  shift
done
output="${output:-accelerator_check.json}"
[[ "$output" == /* ]] || output="$OLDPWD/$output"  # Relative to where the script was called.
[[ -n "$data_dir" && "$data_dir" != /* ]] && data_dir="$OLDPWD/$data_dir"
[[ -n "$scratch" && "$scratch" != /* ]] && scratch="$OLDPWD/$scratch"
[[ -n "$wheels" && "$wheels" != /* ]] && wheels="$OLDPWD/$wheels"
[[ -z "$wheels" || -d "$wheels" || "$dry_run" == 1 ]] || die "--wheels=$wheels is not a directory"
make_venv=0
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then
    PYTHON="$ROOT/.venv/bin/python"
  elif [[ -n "$wheels" ]]; then
    PYTHON="$ROOT/.venv/bin/python" make_venv=1  # The install step makes it.
  else
    PYTHON=python3
  fi
fi
scale="${TIMEOUT_SCALE:-1}"
[[ "$scale" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "TIMEOUT_SCALE=$scale is not a number"
mode=accelerator
((smoke)) && mode=cpu-smoke

if ((dry_run)); then
  scratch="${scratch:-${TMPDIR:-/tmp}/accelerator_check.XXXXXX}"
else
  if [[ -z "$scratch" ]]; then
    scratch="$(mktemp -d "${TMPDIR:-/tmp}/accelerator_check.XXXXXX")" || die 'cannot make a scratch directory'
  elif [[ -e "$scratch" && -n "$(ls -A "$scratch" 2>/dev/null)" ]]; then
    die "--workdir=$scratch is not empty (its runs would resume instead of starting afresh)"
  fi
  mkdir -p "$scratch/steps" "$scratch/runs" || die "cannot write $scratch"
  mkdir -p "$(dirname "$output")" || die "cannot write $output"
fi

# The helper's record/stamp/assemble need only the standard library: fall back to python3 when
# the Python under test is broken, so that the JSON still says what failed.
helper=("$PYTHON")
if ((!dry_run)) && { ((make_venv)) || ! "$PYTHON" -c 'import json' >/dev/null 2>&1; }; then
  helper=(python3)
fi
helper+=("$ROOT/launch/accelerator_check.py")

export PYTHONUNBUFFERED=1  # Output lines are timed as they arrive (the demo's epoch lines).
if ((smoke)); then
  export JAX_PLATFORMS=cpu
  # The smoke runs torch.compile's code path with Dynamo off: compiling on 2 CPUs takes minutes.
  smoke_env=(env TORCHDYNAMO_DISABLE=1)
else
  smoke_env=()
fi

# --- The steps: name, kind, timeout (s), then the command. -------------------------------------
# On the GPU the timeouts add up to under 10 minutes; the runs share a compilation cache per set
# of XLA flags, so only the first of each compiles.
cache="$scratch/xla_cache_default"
demo_args=(--config=configs/fashion_mnist_demo.py --config.model.dtype=bfloat16
           "--config.data_dir=$data_dir" --config.progress_bar=false)
bench_args=(--config.model.dtype=bfloat16 "--config.compilation_cache_dir=$cache")
mini_110=() mini_272=() pipeline_args=() frameworks_272=jax,torch_eager_cl resume_smoke=()
skip_272_compile=''
min_accuracy=0.90
if ((smoke)); then
  demo_args+=(--config.num_train_steps=40 --config.checkpoint_every_steps=10
              --config.log_every_steps=10 --config.model.alpha=8 --config.batch_size=16
              --config.eval_batch_size=100 --config.write_report=false)
  bench_args+=(--config.batch_size=4 --config.model.alpha=8 --steps=1 --warmup=0)
  mini_110=(--config.model.depth=8)   # Basic blocks: depth 6n+2.
  mini_272=(--config.model.depth=11)  # Bottleneck blocks: depth 9n+2.
  pipeline_args=(--batches=5 --warmup=1)
  min_accuracy=0  # 40 steps of a tiny network: the run must finish, not learn.
  # The 110 steps run every framework variant already; on 2 CPUs the others' start-ups would
  # double the smoke's time.
  frameworks_272=jax skip_272_compile='cpu-smoke: the 110 a48 steps run torch.compile already'
  resume_smoke=(--smoke)
fi
demo_batch=64
for a in "${demo_args[@]}"; do [[ "$a" == --config.batch_size=* ]] && demo_batch="${a#*=}"; done

quote() {  # Shell words that read back as the arguments, quoted only where needed.
  local a out=()
  for a; do
    if [[ "$a" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then out+=("$a"); else out+=("$(printf '%q' "$a")"); fi
  done
  echo "${out[*]}"
}

step_names=() step_kinds=() step_timeouts=() step_extras=() step_commands=()
add_step() {  # NAME KIND TIMEOUT EXTRA(KEY=VALUE;...) -- COMMAND...
  local name="$1" kind="$2" timeout="$3" extra="$4"
  shift 5
  step_names+=("$name") step_kinds+=("$kind") step_extras+=("$extra")
  step_timeouts+=("$(awk -v t="$timeout" -v s="$scale" 'BEGIN { printf "%d", t * s }')")
  step_commands+=("$(quote "$@")")
}

if [[ -n "$wheels" ]]; then
  install=("$ROOT/launch/accelerator_check.py" install "--wheels=$wheels" "--python=$PYTHON")
  ((make_venv)) && install+=(--make_venv)
  add_step install install 300 "description=offline install from $wheels;budget=no" -- \
    python3 "${install[@]}"
fi
add_step devices devices 20 'description=what JAX sees' -- \
  "$PYTHON" launch/accelerator_check.py devices "--out=$scratch/steps/devices/result.json"
add_step demo demo 70 "description=the Fashion-MNIST demo in bfloat16;workdir=$scratch/runs/demo;batch_size=$demo_batch;min_accuracy=$min_accuracy;dtype=bfloat16" -- \
  "$PYTHON" -m pyramidnet_jax.main "${demo_args[@]}" "--workdir=$scratch/runs/demo" \
  "--config.compilation_cache_dir=$cache"
add_step resume resume 170 "description=SIGKILL after the first checkpoint, then the same command to the end: with XLA_FLAGS=--xla_gpu_deterministic_ops=true against an uninterrupted run (must be bit-identical), then with the default flags against the demo run (recorded)" -- \
  "$PYTHON" launch/accelerator_check.py resume "--out=$scratch/steps/resume/result.json" \
  "--scratch=$scratch" "--python=$PYTHON" "--reference=$scratch/runs/demo" "${resume_smoke[@]}" \
  -- "${demo_args[@]}"
for net in 110_a48 272_a200; do
  frameworks=jax,torch_eager_cl skip=''
  if [[ "$net" == 110_a48 ]]; then
    mini=("${mini_110[@]}") t=(55 60)
  else
    mini=("${mini_272[@]}") t=(75 60) frameworks="$frameworks_272" skip="$skip_272_compile"
  fi
  add_step "bench_$net" benchmark "${t[0]}" "description=ours and PyTorch eager (channels_last, bf16 autocast)" -- \
    "$PYTHON" -m pyramidnet_jax.benchmark "--config=configs/cifar10_$net.py" "${bench_args[@]}" "${mini[@]}" \
    "--frameworks=$frameworks" "--output=$scratch/steps/bench_$net/result.json"
  add_step "bench_${net}_compile" benchmark "${t[1]}" "description=torch.compile (channels_last, bf16 autocast);paired_with=bench_$net${skip:+;skip=$skip}" -- \
    "${smoke_env[@]}" "$PYTHON" -m pyramidnet_jax.benchmark "--config=configs/cifar10_$net.py" "${bench_args[@]}" "${mini[@]}" \
    --frameworks=torch_compile_cl "--output=$scratch/steps/bench_${net}_compile/result.json"
done
add_step remat_272_a200 remat 50 'description=ours with remat: peak memory against bench_272_a200;compare_with=bench_272_a200' -- \
  "$PYTHON" -m pyramidnet_jax.benchmark --config=configs/cifar10_272_a200.py "${bench_args[@]}" "${mini_272[@]}" \
  --config.model.remat=true --frameworks=jax "--output=$scratch/steps/remat_272_a200/result.json"
add_step pipeline pipeline 20 'description=the input pipeline alone' -- \
  "$PYTHON" -m pyramidnet_jax.pipeline_benchmark --config=configs/fashion_mnist_demo.py \
  "--config.data_dir=$data_dir" "${pipeline_args[@]}"

n=${#step_names[@]}
budget=0  # The check's own steps: the install comes on top.
for ((i = 0; i < n; i++)); do
  [[ "${step_extras[i]}" == *';budget=no'* ]] || budget=$((budget + step_timeouts[i]))
done

if ((dry_run)); then
  echo "launch/accelerator_check.sh ($mode): $n steps, timeouts adding up to $budget s; output $output; runs in $scratch"
  for ((i = 0; i < n; i++)); do
    echo "[$((i + 1))/$n] ${step_names[i]} (timeout ${step_timeouts[i]} s)"
    description="${step_extras[i]%%;*}"
    echo "  # ${description#description=}"
    [[ "${step_extras[i]}" == *';skip='* ]] && echo "  # skipped: ${step_extras[i]##*;skip=}"
    echo "  ${step_commands[i]}"
  done
  exit 0
fi

started="$(date -u +%Y-%m-%dT%H:%M:%S+00:00)" started_epoch="$(date +%s)"
assemble() {
  "${helper[@]}" assemble "--scratch=$scratch" "--output=$output" "--mode=$mode" \
    "--python=$PYTHON" "--data_dir=$data_dir" "--started=$started" \
    "--started_epoch=$started_epoch" "$@"
}
record() {  # INDEX [--rc=RC --wall=S]
  local i="$1" extras=() item step_argv=()
  shift
  IFS=';' read -ra items <<<"${step_extras[i]}"
  for item in "${items[@]}"; do extras+=("--extra=$item"); done
  eval "step_argv=(${step_commands[i]})"  # The quoted words back into arguments.
  "${helper[@]}" record "--dir=$scratch/steps/${step_names[i]}" "--name=${step_names[i]}" \
    "--kind=${step_kinds[i]}" "--index=$i" "--timeout=${step_timeouts[i]}" "${extras[@]}" "$@" \
    -- "${step_argv[@]}"
}

for ((i = 0; i < n; i++)); do record "$i"; done  # The plan: every step 'not run' until it runs.
assemble
echo "launch/accelerator_check.sh ($mode): $n steps, timeouts adding up to $budget s; JSON: $output; runs and logs: $scratch"
for ((i = 0; i < n; i++)); do
  name="${step_names[i]}"
  echo "[$((i + 1))/$n] $name (timeout ${step_timeouts[i]} s)"
  if [[ "${step_extras[i]}" == *';skip='* ]]; then  # Recorded as skipped, with the reason.
    record "$i" --rc=0 --wall=0
    assemble "--announce=$name"
    continue
  fi
  step_argv=()
  eval "step_argv=(${step_commands[i]})"
  t0="$(date +%s.%N)"
  timeout --kill-after=2 "${step_timeouts[i]}" "${helper[@]}" stamp \
    "--log=$scratch/steps/$name/log.txt" -- "${step_argv[@]}" </dev/null >/dev/null 2>&1
  rc=$?
  wall="$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
  record "$i" "--rc=$rc" "--wall=$wall"
  assemble "--announce=$name"
done
assemble --final
