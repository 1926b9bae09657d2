#!/usr/bin/env bash
# The README's "Reproduction on a laptop CPU": Iterative RPO (arXiv 2404.19733v3) and sDPO (arXiv 2403.19270v1)
# with the embedded SmolLM2-135M-Instruct on built-in 1-digit arithmetic (+, -, ×), then the plots.
# Every command resumes after its last finished stage: run the script again after a stop.
set -euo pipefail
OUT=${OUT:-runs/repro}
PLOTS=${PLOTS:-plots/repro}
# 48 of the 87 train expressions; all 120 test expressions (one in 2 belongs to the test split)
# (one pass over the pairs and maj@4, as when these runs were made; the demo's defaults are two passes, no maj@k)
TASK=(--arith-ops "+-*" --arith-test-every 2 --n-train 48 --n-test 120 --max-new-tokens 96 --lr 1e-4 --epochs 1
      --eval-k 4)

python rpo.py "${TASK[@]}" --iterations 3 --seed 0 --out "$OUT/rpo-seed0"                      # Table 1
# the same first iteration (same M_0 evaluation, samples and pairs), other losses
python rpo.py "${TASK[@]}" --iterations 1 --alpha 0 --samples-from "$OUT/rpo-seed0" --out "$OUT/dpo-seed0"  # Fig. 3
python rpo.py "${TASK[@]}" --iterations 1 --sft --samples-from "$OUT/rpo-seed0" --out "$OUT/sft-seed0"      # STaR
# sDPO (2 steps) against DPO on all data at once, on the pairs of the first two iterations
PAIRS=("$OUT/rpo-seed0/iter_1/pairs.jsonl" "$OUT/rpo-seed0/iter_2/pairs.jsonl")
python sdpo.py --data "${PAIRS[@]}" --lr 1e-4 --steps 2 --split random --out "$OUT/sdpo-2steps"               # sDPO Table 2
python sdpo.py --data "${PAIRS[@]}" --lr 1e-4 --steps 1 --out "$OUT/sdpo-1step"
python rpo.py "${TASK[@]}" --iterations 3 --seed 1 --out "$OUT/rpo-seed1"                      # second seed

python plot.py "$OUT"/rpo-seed0 "$OUT"/rpo-seed1 "$OUT"/sdpo-2steps "$OUT"/sdpo-1step --out "$PLOTS"
python plot.py --together "$OUT"/rpo-seed0 "$OUT"/rpo-seed1 --out "$PLOTS/seeds.png"
python plot.py --together "$OUT"/rpo-seed0 "$OUT"/dpo-seed0 "$OUT"/sft-seed0 --first 1 --out "$PLOTS/fig3.png"
python plot.py --together "$OUT"/sdpo-2steps "$OUT"/sdpo-1step --out "$PLOTS/sdpo-vs-dpo.png"
