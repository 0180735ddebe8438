#!/usr/bin/env bash
# Train on a Cloud TPU VM slice. Training runs detached from ssh on every worker (setsid + nohup,
# output in ~/pyramidnet_jax/logs/train.log, PID in logs/train.pid), so a closed laptop or a
# dropped connection does not stop a multi-day run; `logs`, `status`, `fetch-logs` and `copy`
# reattach to it at any time.
#
#   launch/tpu_vm.sh --project=MY_PROJECT                 # v4-8: create, install, train, wait, copy, delete
#   launch/tpu_vm.sh --project=MY_PROJECT --accelerator=v4-32 --workdir=gs://MY_BUCKET/runs/c10 \
#       create install train                              # start it and go home
#   launch/tpu_vm.sh --project=MY_PROJECT --accelerator=v4-32 logs --worker=all
#   launch/tpu_vm.sh --project=MY_PROJECT --accelerator=v4-32 copy fetch-logs delete
#   launch/tpu_vm.sh --dry-run ...                        # print the commands only
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh [options] [STEP ...] [-- --config.<field>=value ...]

Trains `python -m pyramidnet_jax.main --config=CONFIG --workdir=WORKDIR OVERRIDES` on every worker
of a Cloud TPU VM slice, detached from ssh (one JAX process per host; each finds the slice by
itself). Without a STEP it runs them all: create, install, train, wait, copy, fetch-logs, delete.

Steps (any of them, in the order given):
  create       create the slice
  install      copy this repository (its committed HEAD, as a git archive) to every worker, make
               the venv with the [tpu] extra, prepare the data
  train        start training on every worker under setsid/nohup; output goes to
               ~/pyramidnet_jax/logs/train.log on each worker, the PID to logs/train.pid
  wait         follow worker 0's log until training ends on every worker
  logs         follow the log of --worker (default 0, or all) until training ends (Ctrl-C stops
               following, not training)
  status       whether training runs on each worker, or its exit status
  copy         copy WORKDIR into OUT (from worker 0, or from gs://)
  fetch-logs   copy every worker's log into OUT/logs/worker-N.log
  stop         stop training on every worker (it resumes from its last checkpoint when started
               again)
  delete       delete the slice

Options (each also read from the environment variable in capitals, e.g. PROJECT=...):
  --project=P       Google Cloud project (default: gcloud's configured project)
  --zone=Z          zone (default: us-central2-b for v4, us-west4-a for v5litepod, us-east5-a for
                    v5p, us-east5-b for v6e)
  --name=N          TPU name (default: pyramidnet-$USER)
  --accelerator=A   accelerator type (default: v4-8; e.g. v4-32, v5litepod-8, v5litepod-16)
  --version=V       TPU VM runtime image (default by type: tpu-ubuntu2204-base for v4,
                    v2-alpha-tpuv5-lite for v5litepod, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
  --hosts=H         workers of the slice (default: from the accelerator type)
  --config=C        training config (default: configs/cifar10_110_a48.py)
  --workdir=W       workdir on the workers (default: runs/NAME, relative to ~/pyramidnet_jax). A
                    slice of several hosts writes its checkpoints together, so there it must be
                    gs://BUCKET/PATH, or an absolute path that every worker mounts declared with
                    --shared
  --out=O           local directory that receives the workdir and the logs (default: runs/NAME-tpu)
  --shared          --workdir is an absolute path that every worker mounts (Filestore, gcsfuse):
                    the promise that lets a slice of several hosts use it
  --worker=W        the worker for `logs`: a number or all (default: 0)
  --spot            create a Spot slice (much cheaper; may be preempted: `create install train`
                    again resumes from the last checkpoint)
  --keep            do not delete the slice at the end of a full run
  --reuse           the slice exists already: a full run skips `create` (and still deletes the
                    slice at the end unless --keep)
  --dry-run         print every command (gcloud and local) instead of running it
  -h, --help        this text
Arguments after -- are appended to the training command (config overrides).

Once training has started, the script never deletes the slice on its own unless training ended:
if the connection drops or you press Ctrl-C while waiting, training goes on, and `logs`, `copy`,
`fetch-logs` and `delete` (with the same options) pick it up later. The slice bills until deleted.

Needs: the gcloud CLI, logged in (gcloud auth login), with the TPU API enabled in the project
and TPU quota in the zone.
EOF
}

die() {
  { echo "launch/tpu_vm.sh: error: $*"; usage | sed -n 1p; echo 'Run launch/tpu_vm.sh -h for details.'; } >&2
  exit 2
}

user="$(printf '%s' "${USER:-user}" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9' '-')"
PROJECT="${PROJECT:-}" ZONE="${ZONE:-}" NAME="${NAME:-pyramidnet-${user%-}}"
ACCELERATOR="${ACCELERATOR:-v4-8}" VERSION="${VERSION:-}" HOSTS="${HOSTS:-}"
CONFIG="${CONFIG:-configs/cifar10_110_a48.py}" WORKDIR="${WORKDIR:-}" OUT="${OUT:-}"
WORKER=0 SHARED=0 SPOT=0 KEEP=0 REUSE=0 DRY_RUN=0
STEPS=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --name=*) NAME="${1#*=}" ;;
    --accelerator=*|--accelerator-type=*) ACCELERATOR="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --hosts=*) HOSTS="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --out=*) OUT="${1#*=}" ;;
    --worker=*) WORKER="${1#*=}" ;;
    --shared) SHARED=1 ;;
    --spot) SPOT=1 ;;
    --keep) KEEP=1 ;;
    --reuse) REUSE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    create|install|train|wait|logs|status|copy|fetch-logs|stop|delete) STEPS+=("$1") ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (config overrides go after --)" ;;
  esac
  shift
done
OVERRIDES=("$@")
FULL=0
if ((${#STEPS[@]} == 0)); then  # A full run; the slice is deleted at exit, unless --keep.
  FULL=1 STEPS=(create install train wait copy fetch-logs)
  ((!REUSE)) || STEPS=("${STEPS[@]:1}")
fi
has_step() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "--name must be lower-case letters, digits and hyphens, starting with a letter: '$NAME'"
[[ -f "$ROOT/$CONFIG" ]] || die "no config file $CONFIG in $ROOT (give a path relative to the repository root)"
[[ "$WORKER" =~ ^([0-9]+|all)$ ]] || die "--worker must be a number or all, got '$WORKER'"
# Hosts: the suffix counts TensorCores on v2, v3, v4 and v5p (8 per host), chips on v5e and v6e
# (4 per host on slices of more than 8 chips).
cores="${ACCELERATOR##*-}"
[[ "$cores" =~ ^[0-9]+$ ]] || cores=0
case "$ACCELERATOR" in
  v4-*) default_zone=us-central2-b default_version=tpu-ubuntu2204-base default_hosts=$(((cores + 7) / 8)) ;;
  v5litepod-*|v5e-*) default_zone=us-west4-a default_version=v2-alpha-tpuv5-lite default_hosts=$((cores <= 8 ? 1 : cores / 4)) ;;
  v5p-*) default_zone=us-east5-a default_version=v2-alpha-tpuv5 default_hosts=$(((cores + 7) / 8)) ;;
  v6e-*) default_zone=us-east5-b default_version=v2-alpha-tpuv6e default_hosts=$((cores <= 8 ? 1 : cores / 4)) ;;
  *) [[ -n "$ZONE" && -n "$VERSION" && -n "$HOSTS" ]] \
       || die "unknown accelerator '$ACCELERATOR': give --zone, --version and --hosts too"
     default_zone='' default_version='' default_hosts='' ;;
esac
ZONE="${ZONE:-$default_zone}" VERSION="${VERSION:-$default_version}" HOSTS="${HOSTS:-$default_hosts}"
[[ "$HOSTS" =~ ^[1-9][0-9]*$ ]] || die "--hosts must be a positive number, got '$HOSTS'"
WORKDIR="${WORKDIR:-runs/$NAME}" OUT="${OUT:-runs/$NAME-tpu}"
((!SHARED)) || [[ "$WORKDIR" == /* ]] || die "--shared declares an absolute --workdir that every worker mounts, got '$WORKDIR'"
if ((HOSTS > 1)) && has_step train && [[ "$WORKDIR" != gs://* ]] && ((!SHARED)); then
  die "a $ACCELERATOR slice has $HOSTS hosts, which write the checkpoints together, so --workdir must be one they all see: --workdir=gs://BUCKET/runs/$NAME, or an absolute path that every worker mounts (Filestore, gcsfuse) declared with --shared, e.g. --workdir=/mnt/shared/runs/$NAME --shared. '$WORKDIR' would be a separate directory on each worker."
fi


GCLOUD_SCOPE=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || GCLOUD_SCOPE+=(--project="$PROJECT")
TARBALL="${TMPDIR:-/tmp}/pyramidnet_jax-$NAME.tar.gz"
# shellcheck disable=SC2088  # Expanded by the workers' shell, not here.
REMOTE_DIR='~/pyramidnet_jax'
case "$WORKDIR" in
  /*|gs://*) REMOTE_WORKDIR="$WORKDIR" ;;
  *) REMOTE_WORKDIR="$REMOTE_DIR/$WORKDIR" ;;
esac

# Prints a command (shell-quoted, so it can be pasted), then runs it unless --dry-run.
run() {
  local arg out='+'
  for arg; do
    if [[ "$arg" =~ ^[-A-Za-z0-9_./:=@%+,~]+$ ]]; then
      out+=" $arg"
    else
      out+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  printf '%s\n' "$out"
  ((DRY_RUN)) || "$@"
}
ssh_to() {  # ssh_to WORKER COMMAND
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_SCOPE[@]}" --worker="$1" --quiet --command="$2"
}

# The commands that run on each worker, as strings for `ssh --command`.
quote() { printf '%q ' "$@"; }
SETUP="set -euo pipefail
mkdir -p $REMOTE_DIR && tar -xzf ~/pyramidnet_jax.tar.gz -C $REMOTE_DIR
cd $REMOTE_DIR
export PATH=\$HOME/.local/bin:\$PATH
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
[ -x .venv/bin/python ] || uv venv -q --python 3.11 .venv
grep -v '^torch==' requirements.txt > /tmp/requirements-tpu.txt
uv pip install -q --python .venv/bin/python -r /tmp/requirements-tpu.txt -e '.[tpu]'
.venv/bin/python -c 'import jax, libtpu; print(\"jax\", jax.__version__, \"with libtpu\")'
.venv/bin/python launch/prepare_data.py $(quote --config="$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"})"
# shellcheck disable=SC2016  # Expanded on the worker.
RUNNING='[ -f logs/train.pid ] && kill -0 "$(cat logs/train.pid)" 2>/dev/null'
# train.sh outlives the ssh session: its own session (setsid), SIGHUP ignored (nohup), no
# terminal, output appended to the log; the exit status lands in logs/train.status.
TRAIN="set -eu
cd $REMOTE_DIR && mkdir -p logs
if $RUNNING; then
  echo \"\$(hostname): training runs already (PID \$(cat logs/train.pid)): launch/tpu_vm.sh logs\" >&2; exit 3
fi
rm -f logs/train.status
cat > logs/train.sh <<'TRAIN_SH'
cd ~/pyramidnet_jax
echo \"=== \$(date -u +%FT%TZ) \$(hostname) starts training\"
PYTHONUNBUFFERED=1 .venv/bin/python -m pyramidnet_jax.main $(quote --config="$CONFIG" --workdir="$WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
status=\$?
echo \"=== \$(date -u +%FT%TZ) \$(hostname): training ended with exit status \$status\"
echo \$status > logs/train.status
TRAIN_SH
setsid nohup bash logs/train.sh >> logs/train.log 2>&1 < /dev/null &
echo \$! > logs/train.pid
echo \"\$(hostname): training started, PID \$!, log $REMOTE_DIR/logs/train.log\""
# Follows the log until the training process ends (tail --pid); prefixed by host with --worker=all.
follow() {
  local prefix=''
  [[ "$1" != all ]] || prefix=" | sed -u \"s/^/[\$(hostname)] /\""
  echo "cd $REMOTE_DIR && [ -f logs/train.log ] || { echo \"\$(hostname): no training started\" >&2; exit 3; }
pid=\$(cat logs/train.pid 2>/dev/null || true)
tail \${pid:+--pid=\$pid} -n $2 -F logs/train.log$prefix"
}
WAIT="cd $REMOTE_DIR && while $RUNNING; do sleep 10; done
status=\$(cat logs/train.status 2>/dev/null || echo 1)
echo \"\$(hostname): training ended with exit status \$status\"; exit \"\$status\""
STATUS="cd $REMOTE_DIR 2>/dev/null || { echo \"\$(hostname): not installed\"; exit 0; }
if $RUNNING; then echo \"\$(hostname): training runs (PID \$(cat logs/train.pid))\"
elif [ -f logs/train.status ]; then echo \"\$(hostname): training ended with exit status \$(cat logs/train.status)\"
elif [ -f logs/train.pid ]; then echo \"\$(hostname): training was killed before it ended\"
else echo \"\$(hostname): no training started\"; fi"
STOP="cd $REMOTE_DIR && if $RUNNING; then pid=\$(cat logs/train.pid); kill -TERM -- -\$pid 2>/dev/null || kill -TERM \$pid
echo \"\$(hostname): stopped training (PID \$pid)\"; else echo \"\$(hostname): no training runs\"; fi"

# A full run deletes the slice at exit (also on failure or Ctrl-C), but not while training runs
# detached: then it says how to pick it up.
created=0 detached=0
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  local again="launch/tpu_vm.sh --name=$NAME --zone=$ZONE --accelerator=$ACCELERATOR"
  if ((detached)); then
    echo "launch/tpu_vm.sh: training goes on on $NAME, which bills until deleted. Follow it: $again logs; then: $again copy fetch-logs delete" >&2
  elif ((created && !KEEP)); then
    echo "launch/tpu_vm.sh: deleting $NAME" >&2
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_SCOPE[@]}" --quiet || \
      echo "launch/tpu_vm.sh: could not delete $NAME: delete it with: gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE" >&2
  elif ((created)); then
    echo "launch/tpu_vm.sh: $NAME is kept (--keep) and bills until deleted: gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE" >&2
  fi
  exit "$status"
}
if ((FULL)); then
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  ((!REUSE)) || created=1
fi

((DRY_RUN)) || command -v gcloud >/dev/null || die 'gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)'

# The repository as committed (uncommitted changes are not sent), before anything is created.
! has_step install || run git -C "$ROOT" archive --format=tar.gz -o "$TARBALL" HEAD

train_status=0
for step in "${STEPS[@]}"; do
  case "$step" in
    create)
      ((!FULL)) || created=1  # From here on a full run deletes the slice, even if creation fails half-way.
      create=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_SCOPE[@]}"
              --accelerator-type="$ACCELERATOR" --version="$VERSION")
      ((!SPOT)) || create+=(--spot)
      # The workers write a gs:// workdir with the VM's service account, which needs the scope.
      [[ "$WORKDIR" != gs://* ]] || create+=(--scopes=https://www.googleapis.com/auth/cloud-platform)
      run "${create[@]}" ;;
    install)
      # A new VM can refuse SSH for a short while: retry the first copy.
      for attempt in 1 2 3 4 5; do
        if run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME":~/pyramidnet_jax.tar.gz \
             "${GCLOUD_SCOPE[@]}" --worker=all --quiet; then
          break
        fi
        ((attempt < 5)) || die "could not copy the repository to $NAME"
        sleep 30
      done
      ssh_to all "$SETUP" ;;
    train)
      ((!FULL)) || detached=1  # Even if starting fails on some worker: others may be training.
      ssh_to all "$TRAIN"
      echo "launch/tpu_vm.sh: training runs on every worker of $NAME, detached; log: $REMOTE_DIR/logs/train.log" >&2 ;;
    wait|logs)
      worker=0 lines=+1
      [[ "$step" == wait ]] || worker="$WORKER" lines=100
      rc=0
      ssh_to "$worker" "$(follow "$worker" "$lines")" || rc=$?
      if ((rc == 255)); then  # ssh's own failure: the connection, not the training.
        echo "launch/tpu_vm.sh: lost the connection to $NAME; training is not affected" >&2
        exit 255
      fi
      if [[ "$step" == wait ]]; then
        ssh_to all "$WAIT" || train_status=$?
        detached=0
      fi ;;
    status) ssh_to all "$STATUS" ;;
    stop) ssh_to all "$STOP" ;;
    copy)
      # Process 0 (worker 0) writes metrics.jsonl, results.json, the report and TensorBoard files.
      run mkdir -p "$OUT"
      if [[ "$WORKDIR" == gs://* ]]; then
        run gcloud storage rsync --recursive "$WORKDIR" "$OUT" || { rc=$?; ((train_status)) || train_status=$rc; }
      else
        run gcloud compute tpus tpu-vm scp --recurse "$NAME":"$REMOTE_WORKDIR/*" "$OUT" \
          "${GCLOUD_SCOPE[@]}" --worker=0 --quiet || { rc=$?; ((train_status)) || train_status=$rc; }
      fi ;;
    fetch-logs)
      run mkdir -p "$OUT/logs"
      for ((i = 0; i < HOSTS; i++)); do
        run gcloud compute tpus tpu-vm scp "$NAME":"$REMOTE_DIR/logs/train.log" "$OUT/logs/worker-$i.log" \
          "${GCLOUD_SCOPE[@]}" --worker="$i" --quiet || echo "launch/tpu_vm.sh: no log from worker $i" >&2
      done ;;
    delete) run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_SCOPE[@]}" --quiet ;;
  esac
done

if ((train_status)); then
  echo "launch/tpu_vm.sh: training failed (exit status $train_status); what there was is in $OUT" >&2
  exit "$train_status"
fi
if ((DRY_RUN)); then
  echo 'launch/tpu_vm.sh: dry run: nothing was run' >&2
elif has_step copy; then
  echo "launch/tpu_vm.sh: done; results in $OUT/results.json, report in $OUT/report/report.md" >&2
fi
