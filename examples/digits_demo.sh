#!/usr/bin/env bash
# bitcli's main job end to end, offline, on a fresh machine:
#   1. create (or reuse) the virtual environment with what the demo needs: bitcli, its `plots` extra and
#      scikit-learn (.ci/venv; .ci/run adds the test extras to the same venv),
#   2. export scikit-learn's handwritten digits as an image folder (train/ and a held-out test/, 32x32 PNG),
#   3. fine-tune a small BiT from random weights (`bit finetune --random-init`),
#   4. measure it on the held-out images (`bit eval`, with the report page of its errors in $WORK/report/)
#      and classify a few of them (`bit predict`),
#   5. summarise the run (`bit report`; the run drew $WORK/model/curves.png and confusion.png).
# A few minutes on 2 CPU cores. Outputs go to $DEMO_DIR (default runs/digits-demo in the checkout); the venv
# is $BITCLI_VENV (default .venv in the checkout); a relative path in either is taken from the directory the
# demo is started in, as any path typed on a command line is. Measured numbers: examples/README.md.
set -euo pipefail
caller="$PWD"
from_caller() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$caller/$1" ;; esac; }
cd "$(dirname "$0")/.."
VENV=.venv WORK=runs/digits-demo  # the defaults: in the checkout (the script runs from its root)
if [ -n "${BITCLI_VENV:-}" ]; then VENV="$(from_caller "$BITCLI_VENV")"; fi
if [ -n "${DEMO_DIR:-}" ]; then WORK="$(from_caller "$DEMO_DIR")"; fi
export BITCLI_VENV="$VENV"  # .ci/venv makes this one
export HF_HUB_OFFLINE=1 BITCLI_OFFLINE=1  # nothing here needs the network

started=$(date +%s)
echo "== environment ($VENV)"
bash .ci/venv
BIT="$VENV/bin/bit"

echo "== data: scikit-learn digits -> $WORK/digits/{train,test}"
"$VENV/bin/python" examples/export_digits.py "$WORK/digits" --size 32

echo "== bit finetune (small BiT, random init)"
# From random weights the HyperRule's fine-tuning lr (0.003) is too small and 512 images per step are
# slow on a CPU, so this demo raises --lr, lowers --batch-size and --steps, and trains at 32 px with
# small random shifts (resize 34, crop 32); the rest is the HyperRule. The held-out test/ split doubles
# as the validation set reported in metrics.jsonl (no model selection happens on it).
train_started=$(date +%s)
"$BIT" finetune "$WORK/digits" --output "$WORK/model" --overwrite \
    --random-init --model small --resolution 34:32 --steps 300 --batch-size 128 --lr 0.1 \
    --val "$WORK/digits/test" --seed 0
train_seconds=$(( $(date +%s) - train_started ))

echo "== bit eval on the held-out test images"
"$BIT" eval "$WORK/digits/test" --model "$WORK/model"
"$BIT" eval "$WORK/digits/test" --model "$WORK/model" --format json --plot "$WORK/eval_confusion.png" \
    --report "$WORK/report" > "$WORK/eval.json"

echo "== bit predict on three held-out images"
samples=()
for digit in 3 5 8; do
    files=("$WORK/digits/test/$digit"/*.png)
    samples+=("${files[0]}")
done
"$BIT" predict "${samples[@]}" --model "$WORK/model" --top-k 3

echo "== bit report"
"$BIT" report "$WORK/model"

"$VENV/bin/python" - "$WORK/eval.json" "$train_seconds" "$(( $(date +%s) - started ))" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
print(f"== held-out top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f} on {result['count']} images; "
      f"fine-tuning took {sys.argv[2]} s, the whole demo {sys.argv[3]} s")
sys.exit(0 if result["top1"] >= 0.9 else 1)  # a broken pipeline lands near 0.1, not 0.9
PY
