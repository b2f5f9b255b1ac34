#!/usr/bin/env bash
# Multi-node training on Slurm: one task per GPU; main.py reads SLURM_PROCID/SLURM_NTASKS/SLURM_NODELIST.
#   sbatch --nodes=2 scripts/slurm_train.sh configs/dn_dab_deformable_detr_r50.py logs/dn_deform_r50
# CONFIG and OUTPUT_DIR are relative to the repository root (or absolute). Two minutes before the time limit
# Slurm sends USR1 to this script (--signal=B:USR1@120); it passes the signal on to the training processes,
# which agree on a step (within 10 optimizer steps), write OUTPUT_DIR/checkpoint.pth holding the epoch and the
# batches done in it, and exit; the script then requeues the job, which resumes from that checkpoint.
#SBATCH --job-name=dn-detr
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=72:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail
CONFIG=${1:?usage: sbatch slurm_train.sh CONFIG OUTPUT_DIR [flags]}
OUTPUT=${2:?usage: sbatch slurm_train.sh CONFIG OUTPUT_DIR [flags]}
shift 2
ROOT=$(dirname "$0")/..
if [ ! -f "$ROOT/main.py" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    # sbatch runs a copy of this script: find the repository from the path that was submitted.
    ROOT=$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")/..
fi
cd "$ROOT"
export MASTER_PORT=${MASTER_PORT:-29500}
RESUME=()
if [ -f "$OUTPUT/checkpoint.pth" ]; then RESUME=(--resume "$OUTPUT/checkpoint.pth"); fi

SIGNALLED=0
TRAINING=
# srun forwards the signal to all its tasks.
trap 'SIGNALLED=1; kill -USR1 "$TRAINING" 2>/dev/null || true' USR1
srun python main.py --config "$CONFIG" --coco_path "${COCO_PATH:-data/coco}" --output_dir "$OUTPUT" \
    "${RESUME[@]}" "$@" &
TRAINING=$!
wait "$TRAINING" || true  # returns early when the signal arrives
STATUS=0
wait "$TRAINING" || STATUS=$?
if [ "$SIGNALLED" = 1 ]; then
    echo "Signalled (training exit status $STATUS): requeueing job $SLURM_JOB_ID to resume from $OUTPUT"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$STATUS"
