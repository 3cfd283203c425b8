#!/bin/bash
# Train jax-brainage on a Cloud TPU VM pod slice: the same command on every worker.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY VALUE ...]
#   e.g. launch/tpu_pod.sh brainage-v5p-32 us-east5-a configs/mrinet_t1.py gs://BUCKET/runs/t1
#
# gcloud runs `brainage train` on all workers (--worker=all); on a TPU VM,
# `python -m jax_brainage.distributed` calls jax.distributed.initialize() with no arguments and
# JAX reads the worker number, the pod's hosts and the coordinator from the TPU metadata. The
# workdir must be visible to every worker: a gs:// bucket (orbax and TensorBoard write there
# directly) or a shared file system. The prepared cache (config.data.cache) must be on every
# worker at the same path (copy it to local SSD, or a shared file system); each worker reads only
# its rows of each global batch.
#
# Set-up once per TPU VM (edit REPO/VERSION): the environment must be the same on all workers.
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all --command \
#     'pip install "jax[tpu]" && pip install git+https://REPO/jax-brainage.git'
#
# Logs: every worker's output comes back through gcloud; the run's own logs and metrics are
# written by process 0 only. Ctrl-C stops gcloud; the workers may keep running without their
# ssh session: list them with --command 'pgrep -af jax_brainage' and stop them by
# process id (kill PID). Re-running this script resumes from the workdir's latest checkpoint.

set -euo pipefail

TPU_NAME=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY VALUE ...]}
ZONE=${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY VALUE ...]}
CONFIG=${3:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY VALUE ...]}
WORKDIR=${4:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY VALUE ...]}
shift 4
PROJECT_FLAG=${GCLOUD_PROJECT:+--project=$GCLOUD_PROJECT}
REPO_DIR=${BRAINAGE_REPO_DIR:-\$HOME/jax-brainage}   # where the repository is on the workers

# Quote the extra overrides for the remote shell.
EXTRA=""
for arg in "$@"; do EXTRA+=" $(printf '%q' "$arg")"; done

REMOTE="cd $REPO_DIR && \
export JAX_COMPILATION_CACHE_DIR=\$HOME/.cache/brainage/jax && \
export PYTHONUNBUFFERED=1 && \
python3 -m jax_brainage train --config $(printf '%q' "$CONFIG") \
  --workdir $(printf '%q' "$WORKDIR") --quiet$EXTRA"

echo "brainage: running on every worker of $TPU_NAME ($ZONE): $REMOTE"
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" $PROJECT_FLAG --worker=all \
  --command "$REMOTE"
