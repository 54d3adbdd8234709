#!/usr/bin/env bash
# Regenerates every number and figure of reports/paper/ (see reports/README.md), one model at a time:
#   bash recipes/paper/reproduce.sh smollm2-135m      # ~55 min on 2 CPU cores
#   bash recipes/paper/reproduce.sh gemma3-270m       # ~80 min
# Each step is one documented command; a killed run resumes from the v(S) store when started again.
# The slice is fixed: 40 documents per task (seed 0) of every real task in ../shared/data and of the
# bundled tasks for the sweep; the paper's six tasks at 20 documents for Shapley; bf16 for both
# (fp32 is the reference: reports/README.md gives the full-model scores in both).
set -euo pipefail
model="${1:?usage: reproduce.sh smollm2-135m|gemma3-270m}"
out=reports/paper
case "$model" in
  smollm2-135m) budget=160 ;;
  gemma3-270m) budget=100 ;;
  *) budget=160 ;;
esac
mkdir -p "$out"

# 1. single-sublayer ablation on every task (the paper's Figures 3-5; -tasks.png has one panel per task)
cornerstone score "$model" --method ablation --granularity sublayer \
  --tasks cornerstone_real_all,cornerstone_bundled --limit 40 --seed 0 --dtype bfloat16 \
  --out "$out/$model-ablation.json"

# 2. Shapley values per sublayer with 95% intervals (the paper's Figure 2: -shares.png)
cornerstone score "$model" --method shapley --estimator kernel --granularity sublayer --budget "$budget" \
  --tasks cornerstone_paper --limit 20 --seed 0 --dtype bfloat16 \
  --out "$out/$model-shapley.json"

# 3. full-model scores in float32 on the sweep's documents (the reference for the bf16 runs)
cornerstone score "$model" --method ablation --granularity block --players L0 \
  --tasks cornerstone_real_all,cornerstone_bundled --limit 40 --seed 0 --dtype float32 \
  --out "$out/$model-fp32-check.json"

# 4. one-pass proxies, their agreement with ablation and Shapley, and retention after dropping each
#    method's bottom 25% of blocks (exported, then evaluated with lm-eval on held-out documents)
python bench/proxy_fidelity.py --model "$model" --truth "$out/$model-ablation.json" --truth "$out/$model-shapley.json" \
  --eval-limit 30 --eval-seed 1 --eval-dtype bfloat16 --batch-size 8 --prefix "$out/$model"

# 5. the claims table
python bench/paper_claims.py "$model" --folder "$out"
