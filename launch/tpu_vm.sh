#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it, install the repository on every worker, train with
# `--worker=all` (one JAX process per host; jax.distributed finds the slice by itself), copy the
# workdir back from worker 0, delete the slice (also on failure or Ctrl-C, unless --keep).
#
#   launch/tpu_vm.sh --project=MY_PROJECT                                  # v4-8, us-central2-b
#   launch/tpu_vm.sh --project=MY_PROJECT --accelerator=v5litepod-8 --zone=us-west4-a \
#       --config=configs/cifar100_110_a48.py -- --config.batch_size=256
#   launch/tpu_vm.sh --dry-run ...                                         # print the commands only
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh [options] [-- --config.<field>=value ...]

Creates a Cloud TPU VM slice, installs this repository (its committed HEAD, as a git archive) on
every worker, trains `python -m pyramidnet_jax.main --config=CONFIG --workdir=WORKDIR OVERRIDES`
on all workers at once, copies WORKDIR back from worker 0 into OUT, and deletes the slice.

Options (each also read from the environment variable in capitals, e.g. PROJECT=...):
  --project=P       Google Cloud project (default: gcloud's configured project)
  --zone=Z          zone (default: us-central2-b for v4, us-west4-a for v5litepod, us-east5-a for
                    v5p, us-east5-b for v6e)
  --name=N          TPU name (default: pyramidnet-$USER)
  --accelerator=A   accelerator type (default: v4-8; e.g. v4-16, v5litepod-8, v5litepod-16)
  --version=V       TPU VM runtime image (default by type: tpu-ubuntu2204-base for v4,
                    v2-alpha-tpuv5-lite for v5litepod, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
  --config=C        training config (default: configs/cifar10_110_a48.py)
  --workdir=W       workdir on the workers, relative to ~/pyramidnet_jax or absolute (default:
                    runs/NAME); on a multi-host slice, a directory all workers share
  --out=O           local directory that receives the workdir (default: runs/NAME-tpu)
  --spot            create a Spot slice (much cheaper; may be preempted: rerun the script with
                    --keep to resume from the last checkpoint)
  --keep            do not delete the slice at the end (delete it yourself:
                    gcloud compute tpus tpu-vm delete NAME --zone=Z)
  --reuse           the slice exists already (e.g. from --keep): skip creating it; it is still
                    deleted at the end unless --keep. The workers keep their .venv and runs/,
                    so training resumes from the last checkpoint
  --dry-run         print every command (gcloud and local) instead of running it
  -h, --help        this text
Arguments after -- are appended to the training command (config overrides).

Needs: the gcloud CLI, logged in (gcloud auth login), with the TPU API enabled in the project
and TPU quota in the zone. Multi-host slices (v4-16 and up, v5litepod-16 and up) need a
workdir that all workers share for checkpoints (see launch/README.md).
EOF
}

die() {
  { echo "launch/tpu_vm.sh: error: $*"; usage | sed -n 1p; echo 'Run launch/tpu_vm.sh -h for details.'; } >&2
  exit 2
}

user="$(printf '%s' "${USER:-user}" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9' '-')"
PROJECT="${PROJECT:-}" ZONE="${ZONE:-}" NAME="${NAME:-pyramidnet-${user%-}}"
ACCELERATOR="${ACCELERATOR:-v4-8}" VERSION="${VERSION:-}"
CONFIG="${CONFIG:-configs/cifar10_110_a48.py}" WORKDIR="${WORKDIR:-}" OUT="${OUT:-}"
SPOT=0 KEEP=0 REUSE=0 DRY_RUN=0
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --name=*) NAME="${1#*=}" ;;
    --accelerator=*|--accelerator-type=*) ACCELERATOR="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --out=*) OUT="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --keep) KEEP=1 ;;
    --reuse) REUSE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (config overrides go after --)" ;;
  esac
  shift
done
OVERRIDES=("$@")

[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "--name must be lower-case letters, digits and hyphens, starting with a letter: '$NAME'"
[[ -f "$ROOT/$CONFIG" ]] || die "no config file $CONFIG in $ROOT (give a path relative to the repository root)"
case "$ACCELERATOR" in
  v4-*) default_zone=us-central2-b default_version=tpu-ubuntu2204-base ;;
  v5litepod-*|v5e-*) default_zone=us-west4-a default_version=v2-alpha-tpuv5-lite ;;
  v5p-*) default_zone=us-east5-a default_version=v2-alpha-tpuv5 ;;
  v6e-*) default_zone=us-east5-b default_version=v2-alpha-tpuv6e ;;
  *) [[ -n "$ZONE" && -n "$VERSION" ]] \
       || die "unknown accelerator '$ACCELERATOR': give --zone and --version too"
     default_zone='' default_version='' ;;
esac
ZONE="${ZONE:-$default_zone}" VERSION="${VERSION:-$default_version}"
WORKDIR="${WORKDIR:-runs/$NAME}" OUT="${OUT:-runs/$NAME-tpu}"

JAX_VERSION="$(sed -n 's/^jax==\([^ #]*\).*/\1/p' "$ROOT/requirements.txt")"
[[ -n "$JAX_VERSION" ]] || die "no jax==VERSION pin in $ROOT/requirements.txt"

GCLOUD_SCOPE=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || GCLOUD_SCOPE+=(--project="$PROJECT")
TARBALL="${TMPDIR:-/tmp}/pyramidnet_jax-$NAME.tar.gz"
REMOTE_DIR='~/pyramidnet_jax'  # Expanded by the workers' shell.
if [[ "$WORKDIR" == /* ]]; then REMOTE_WORKDIR="$WORKDIR"; else REMOTE_WORKDIR="$REMOTE_DIR/$WORKDIR"; fi

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

# The commands that run on each worker, as one string for `ssh --command`.
quote() { printf '%q ' "$@"; }
SETUP="set -euo pipefail
mkdir -p $REMOTE_DIR && tar -xzf ~/pyramidnet_jax.tar.gz -C $REMOTE_DIR
cd $REMOTE_DIR
export PATH=\$HOME/.local/bin:\$PATH
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
[ -x .venv/bin/python ] || uv venv -q --python 3.11 .venv
grep -v '^torch==' requirements.txt > /tmp/requirements-tpu.txt
uv pip install -q --python .venv/bin/python -r /tmp/requirements-tpu.txt -e . 'jax[tpu]==$JAX_VERSION'
.venv/bin/python -c 'import jax, libtpu; print(\"jax\", jax.__version__, \"with libtpu\")'
.venv/bin/python launch/prepare_data.py $(quote --config="$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"})"
TRAIN="cd $REMOTE_DIR && .venv/bin/python -m pyramidnet_jax.main $(quote --config="$CONFIG" --workdir="$WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"})"

created=0
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if ((created && !KEEP)); then
    echo "launch/tpu_vm.sh: deleting $NAME" >&2
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_SCOPE[@]}" --quiet || \
      echo "launch/tpu_vm.sh: could not delete $NAME: delete it with: gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE" >&2
  elif ((created)); then
    echo "launch/tpu_vm.sh: $NAME is kept (--keep) and bills until deleted: gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE" >&2
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

((DRY_RUN)) || command -v gcloud >/dev/null || die 'gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)'

# The repository as committed (uncommitted changes are not sent).
run git -C "$ROOT" archive --format=tar.gz -o "$TARBALL" HEAD

if ((!REUSE)); then
  created=1  # From here on the slice is deleted at exit, even if creation fails half-way.
  create=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_SCOPE[@]}"
          --accelerator-type="$ACCELERATOR" --version="$VERSION")
  ((!SPOT)) || create+=(--spot)
  run "${create[@]}"
else
  created=1
fi

# A new VM can refuse SSH for a short while: retry the first copy.
for attempt in 1 2 3 4 5; do
  if run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME":~/pyramidnet_jax.tar.gz \
       "${GCLOUD_SCOPE[@]}" --worker=all --quiet; then
    break
  fi
  ((attempt < 5)) || die "could not copy the repository to $NAME"
  sleep 30
done
run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_SCOPE[@]}" --worker=all --quiet --command="$SETUP"

train_status=0
run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_SCOPE[@]}" --worker=all --quiet --command="$TRAIN" \
  || train_status=$?

# Worker 0 (process 0) writes metrics.jsonl, results.json, the report and TensorBoard files.
run mkdir -p "$OUT"
run gcloud compute tpus tpu-vm scp --recurse "$NAME":"$REMOTE_WORKDIR/*" "$OUT" \
  "${GCLOUD_SCOPE[@]}" --worker=0 --quiet || { rc=$?; ((train_status)) || train_status=$rc; }
if ((train_status)); then
  echo "launch/tpu_vm.sh: training failed (exit status $train_status); what there was is in $OUT" >&2
  exit "$train_status"
fi
if ((DRY_RUN)); then
  echo 'launch/tpu_vm.sh: dry run: nothing was run' >&2
else
  echo "launch/tpu_vm.sh: done; results in $OUT/results.json, report in $OUT/report/report.md" >&2
fi
