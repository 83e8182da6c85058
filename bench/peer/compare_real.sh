#!/usr/bin/env bash
# derm against the PyTorch reference (reference_train.py) on the same real ISIC 2017 images, the
# same train/validation ids and the same CPU minutes, one run after the other (never two at once:
# each gets the whole machine).
#
#   bench/peer/compare_real.sh DATA OUT [MINUTES] [SPLIT] [TASKS]
#
#   DATA     an ISIC 2017 training layout (../shared/data/isic2017-train-256)
#   OUT      results folder: OUT/split/ (the split files, made once), one folder per run with its
#            log and JSON, and OUT/summary.json (every run's scores, one object per line)
#   MINUTES  training minutes of every run (default 10); scoring is not counted
#   SPLIT    shift (default: the highest 20% of ISIC ids held out, a collection shift) or random
#   TASKS    any of seg-derm, seg-torch, seg-masks, cls-derm, cls-torch (default: seg-derm,
#            seg-torch, cls-derm, cls-torch, in that order). seg-masks writes the lesion masks of
#            the validation ids predicted by this split's and TAG's seg-derm model into its run
#            folder's val_masks/ (for classifiers trained with --lesion-crop).
#
# DERM_EXTRA (environment): more flags for derm's `train` commands (for example
# `--color-constancy 6`), with TAG naming the variant in the run folders and the summary.
# DERM_CLS replaces derm's classification settings (network, size, optimiser, sampling) below,
# for example `--arch resnet18 --width 64 --size 128 --resize 146 --optimizer adam --lr 1e-4
# --balanced --select-operating-point` (the reference's width and learning rate).
# LESION_MASKS (environment): a folder of <id>_segmentation.png (seg-masks writes one) from which
# derm's classification evaluation cuts lesion windows, for a model trained with --lesion-crop
# (without it, the data set's ground-truth masks are used).
#
# derm runs with the settings its pipeline uses at a CPU budget: segmentation the defaults (the
# `medium` dilated U-Net at 128 px, Adam 3e-4, test-time flips included; before 2026-12-04, fifth
# session, the `small` one at 1e-4); classification ResNet-18 at width 32,
# 128 px, Adam 1e-3, shuffled batches, the weights' moving average (decay 0.998), operating point
# chosen on derm's own validation part (10-15% of the training ids), keeping a melanoma sensitivity
# of at least 0.82 there (the default floor; 0.6 before 2026-12-05), and the classifier's final
# weight average kept as its model (before 2026-12-05: its best validation checkpoint). Before
# 2026-12-03 (second session) classification used class-balanced batches and no average
# (`--balanced` without `--ema-decay`). The reference is the typical PyTorch script: plain U-Net width 32 at 128 px,
# Adam 1e-4; torchvision ResNet-18 (width 64) at 128 px, Adam 1e-4, plain batches. Both are
# scored on SPLIT's validation ids with the same metrics (per-image Jaccard at the masks' size,
# ISIC 2017's mean AUC over melanoma and seborrheic keratosis, balanced accuracy).
set -euo pipefail

data="$(realpath "${1:?DATA folder}")"
out="$(realpath -m "${2:?OUT folder}")"
minutes="${3:-10}"
split="${4:-shift}"
tasks="${5:-seg-derm seg-torch cls-derm cls-torch}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${PEER_VENV:-$HOME/.cache/derm-peer-venv}/bin/python"
ref="$repo/bench/peer/reference_train.py"

[ -x "$py" ] || { echo "compare_real.sh: no Python at $py (run bench/peer/setup.sh)" >&2; exit 1; }
mkdir -p "$out"
if [ ! -f "$out/split/${split}_train.txt" ]; then
    "$py" "$ref" --make-split "$out/split" --data "$data" >"$out/split.json"
fi
(cd "$repo" && cargo build -q --locked -p derm-cli)
derm="$repo/target/debug/derm"
train_ids="$out/split/${split}_train.txt"
val_ids="$out/split/${split}_val.txt"
tag="${split}_${minutes}min${TAG:+_$TAG}"
read -r -a extra <<<"${DERM_EXTRA:-}"
read -r -a cls_flags <<<"${DERM_CLS:---arch resnet18 --width 32 --size 128 --resize 146 --optimizer adam --lr 1e-3 --ema-decay 0.998 --select-operating-point}"
export OMP_WAIT_POLICY=PASSIVE

record() { # task framework json-file
    "$py" - "$1" "$2" "$3" "$split" "$minutes" "${TAG:-}" >>"$out/summary.json" <<'PY'
import json, sys
task, fw, path, split, minutes, variant = sys.argv[1:]
text = open(path).read()
try:                        # derm: one (pretty-printed) JSON document
    d = json.loads(text)
except ValueError:          # reference_train.py: the last JSON line
    lines = [l for l in text.splitlines() if l.lstrip().startswith("{")]
    d = json.loads(lines[-1]) if lines else {}
if "metrics" in d:          # reference_train.py
    d = dict(d["metrics"], steps=d.get("steps"), epochs=d.get("epochs"))
for key in ("summary", "report"):   # derm's segment and classify evaluations
    if isinstance(d.get(key), dict):
        d = d[key]
        break
d = {k: v for k, v in d.items() if not isinstance(v, (list, dict)) or k in ("auc", "sensitivity")}
print(json.dumps({"task": task, "framework": fw, "split": split, "minutes": float(minutes), "variant": variant,
                  "scores": d}))
PY
}

for t in $tasks; do
    dir="$out/$t-$tag"
    mkdir -p "$dir"
    echo "== $t ($split, $minutes min) -> $dir" >&2
    case "$t" in
    seg-derm)
        "$derm" -q segment train --root "$data" --manifest isic2017 --ids "$train_ids" --minutes "$minutes" \
            --epochs 1000 "${extra[@]}" --out "$dir/model" 2>"$dir/train.log"
        "$derm" -q segment eval --model "$dir/model" --root "$data" --manifest isic2017 --ids "$val_ids" \
            --json --out "$dir/eval" >"$dir/eval.json" 2>"$dir/eval.log"
        record seg derm "$dir/eval.json"
        ;;
    seg-masks)
        seg_dir="$out/seg-derm-$tag"
        [ -d "$seg_dir/model" ] || { echo "compare_real.sh: no $seg_dir/model (run seg-derm with this TAG first)" >&2; exit 1; }
        mkdir -p "$dir/images"
        while read -r id; do
            [ -n "$id" ] && ln -sf "$data/ISIC-2017_Training_Data/$id.jpg" "$dir/images/$id.jpg"
        done <"$val_ids"
        "$derm" -q segment predict --model "$seg_dir/model" --input "$dir/images" --out "$seg_dir/val_masks" \
            2>"$seg_dir/val_masks_predict.log"
        rm -r "$dir"
        echo "lesion masks of $(grep -c . "$val_ids") validation ids in $seg_dir/val_masks" >&2
        continue
        ;;
    seg-torch)
        "$py" "$ref" seg --data "$data" --train-ids "$train_ids" --val-ids "$val_ids" --minutes "$minutes" \
            --threads 2 >"$dir/result.json" 2>"$dir/train.log"
        record seg pytorch "$dir/result.json"
        ;;
    cls-derm)
        "$derm" -q classify train --root "$data" --manifest isic2017 --ids "$train_ids" --minutes "$minutes" \
            --epochs 1000 "${cls_flags[@]}" "${extra[@]}" --out "$dir/model" 2>"$dir/train.log"
        "$derm" -q classify eval --model "$dir/model" --root "$data" --manifest isic2017 --ids "$val_ids" \
            ${LESION_MASKS:+--lesion-masks "$LESION_MASKS"} --json --out "$dir/eval" >"$dir/eval.json" 2>"$dir/eval.log"
        record cls derm "$dir/eval.json"
        ;;
    cls-torch)
        "$py" "$ref" cls --data "$data" --arch resnet18 --size 128 --train-ids "$train_ids" --val-ids "$val_ids" \
            --minutes "$minutes" --threads 2 >"$dir/result.json" 2>"$dir/train.log"
        record cls pytorch "$dir/result.json"
        ;;
    *) echo "compare_real.sh: unknown task $t" >&2; exit 2 ;;
    esac
    tail -n 1 "$out/summary.json" >&2
done
