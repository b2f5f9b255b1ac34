#!/usr/bin/env bash
# The README's first command: set up, generate the synthetic COCO set, train DN-DETR on the CPU,
# evaluate it with COCO AP after every epoch and plot AP against epoch.
# Extra arguments go to main.py (e.g. --epochs 5, or --device cuda). Each run starts over: it replaces
# the previous demo's outputs/demo (--overwrite_output_dir).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
DATA=data/synthetic
OUT=outputs/demo
if [ ! -f "$DATA/annotations/instances_val2017.json" ]; then
    python -m datasets.synthetic --out "$DATA" --seed 0 --class_colours true
fi
python main.py --config configs/synthetic.py --coco_path "$DATA" --output_dir "$OUT" --overwrite_output_dir "$@"
python scripts/plot_curves.py "$OUT" --out "$OUT/ap_curve.png" --fields AP AP50 loss --table
echo "[demo] AP per epoch: $OUT/log.txt, plot: $OUT/ap_curve.png, checkpoint: $OUT/checkpoint.pth"
