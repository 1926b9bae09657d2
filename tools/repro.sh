#!/usr/bin/env bash
# The reproduction of docs/RESULTS.md: Iterative RPO (arXiv 2404.19733v3) and sDPO (arXiv 2403.19270v1) with the
# embedded SmolLM2-135M-Instruct on built-in 1-digit arithmetic (+, -, ×), the papers' own comparisons, then the
# plots. Every command resumes after its last finished stage: run the script again after a stop. Each part's wall
# time is appended to $OUT/times.txt with the commit and the machine. About 2 hours on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."  # the project's root: rpo.py and sdpo.py are there
OUT=${OUT:-runs/repro}
PLOTS=${PLOTS:-plots/repro}
MODEL=${MODEL:-smollm2-135m}  # tiny-random: a quick check that the script runs through
mkdir -p "$OUT"
# The demo's setting, pinned: 32 training questions (+ 10 held out to pick checkpoints) of the 87 train
# expressions, all 120 test expressions (one in 2 belongs to the test split), 96 new tokens, lr 1e-4, two passes
# over each iteration's pairs, greedy evaluation only.
TASK=(--model "$MODEL" --arith-ops "+-*" --arith-test-every 2 --n-train 32 --n-test 120 --max-new-tokens 96
      --lr 1e-4 --epochs 2 --eval-k 0)
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(nproc) cores" \
     >> "$OUT/times.txt"
part() {  # part NAME COMMAND...: run it, append its wall time
    local name=$1 start=$SECONDS
    shift
    "$@"
    echo "$name $((SECONDS - start)) s" | tee -a "$OUT/times.txt"
}

# 1. Table 1: Iterative RPO, 2 iterations (seed 0; seeds 1 and 2 at the end)
part rpo-seed0 python rpo.py "${TASK[@]}" --iterations 2 --seed 0 --out "$OUT/rpo-seed0"
# 2. Fig. 3: α = 0 against α = 1 on the very samples and pairs of rpo-seed0's iteration 1 (--samples-from), trained
#    three times as long (6 passes) so that the direction of the chosen log-probs shows
part dpo-long python rpo.py "${TASK[@]}" --iterations 1 --epochs 6 --alpha 0 --samples-from "$OUT/rpo-seed0" \
    --out "$OUT/dpo-long"
part rpo-long python rpo.py "${TASK[@]}" --iterations 1 --epochs 6 --alpha 1 --samples-from "$OUT/rpo-seed0" \
    --out "$OUT/rpo-long"
# 3. sDPO Table 2 on one set of pairs, rpo-seed0's two iterations (D_1 from M_0's samples, D_2 from M_1's):
#    sDPO with the files in their given order (the method), sDPO with a random split (the paper's stratified
#    control), DPO on all pairs at once; the same 32 held-out pairs in all three
PAIRS=("$OUT/rpo-seed0/iter_1/pairs.jsonl" "$OUT/rpo-seed0/iter_2/pairs.jsonl")
SDPO=(--model "$MODEL" --lr 1e-4 --epochs 1 --heldout "${HELDOUT:-32}")  # HELDOUT=4 with tiny-random
part sdpo-given python sdpo.py --data "${PAIRS[@]}" "${SDPO[@]}" --steps 2 --split given --out "$OUT/sdpo-given"
part sdpo-random python sdpo.py --data "${PAIRS[@]}" "${SDPO[@]}" --steps 2 --split random --out "$OUT/sdpo-random"
part dpo-at-once python sdpo.py --data "${PAIRS[@]}" "${SDPO[@]}" --steps 1 --out "$OUT/dpo-at-once"
# 4. STaR over iterations: SFT on every correct sample, iteration 1 on rpo-seed0's samples, then its own
part star python rpo.py "${TASK[@]}" --iterations 2 --sft --samples-from "$OUT/rpo-seed0" --out "$OUT/star"
# 5. Table 1's "1 iteration with 2× data": one iteration from M_0 on as many pairs as rpo-seed0's two iterations
#    together; M_0 answers few questions right, so all 77 other training questions and up to 8 pairs each
BOTH=$(python -c "import json; print(sum(json.load(open(f'$OUT/rpo-seed0/iter_{t}/stats.json'))['pairs']
                                         for t in (1, 2)))")
part rpo-2x-data python rpo.py "${TASK[@]}" --iterations 1 --n-train 77 --pairs-per-question 8 --max-pairs "$BOTH" \
    --out "$OUT/rpo-2x-data"
# 6. Table 1 again with seeds 1 and 2 (other training questions, held-out questions and samples)
part rpo-seed1 python rpo.py "${TASK[@]}" --iterations 2 --seed 1 --out "$OUT/rpo-seed1"
part rpo-seed2 python rpo.py "${TASK[@]}" --iterations 2 --seed 2 --out "$OUT/rpo-seed2"

# 7. The plots and tables, from the run directories alone
python tools/plot.py "$OUT"/rpo-seed{0,1,2} "$OUT"/sdpo-given "$OUT"/sdpo-random "$OUT"/dpo-at-once --out "$PLOTS"
python tools/plot.py --together "$OUT"/rpo-seed{0,1,2} "$OUT"/star "$OUT"/rpo-2x-data --out "$PLOTS/table1.png"
python tools/plot.py --together "$OUT"/rpo-long "$OUT"/dpo-long --out "$PLOTS/fig3.png"
python tools/plot.py --together "$OUT"/sdpo-given "$OUT"/sdpo-random "$OUT"/dpo-at-once --out "$PLOTS/sdpo-table2.png"
