#!/usr/bin/env bash
# Regenerates every number and figure of reports/paper/ (see reports/paper/README.md), one model at a time:
#   bash recipes/paper/reproduce.sh smollm2-135m      # ~55 min on 2 CPU cores
#   bash recipes/paper/reproduce.sh gemma3-270m       # ~80 min
# Each step is one documented command; a killed run resumes from the v(S) store when started again.
# The slice is fixed: 40 documents per task (seed 0) of every real task in ../shared/data and of the
# bundled tasks for the sweep; five real tasks at 20 documents for Shapley; bf16 for both
# (fp32 is the reference: the claims table gives the full-model scores in both).
set -euo pipefail
model="${1:?usage: reproduce.sh smollm2-135m|gemma3-270m}"
out=reports/paper
case "$model" in
  gemma3-270m) budget=100 eval_limit=20 ;;  # lm-eval's full-vocabulary log-softmax over 262k tokens is the cost
  *) budget=160 eval_limit=30 ;;
esac
shapley_tasks=cs_real_piqa,cs_real_hellaswag,cs_real_arc_easy,cs_real_copa,cs_real_lambada_openai
mkdir -p "$out"

# 1. single-sublayer ablation on every task (the paper's Figures 3-5; -tasks.png has one panel per task)
cornerstone score "$model" --method ablation --granularity sublayer \
  --tasks cornerstone_real_all,cornerstone_bundled --limit 40 --seed 0 --dtype bfloat16 \
  --out "$out/$model-ablation.json"

# 2. Shapley values per sublayer with 95% intervals (the paper's Figure 2: -shares.png), on the real
#    tasks where SmolLM2's full score is more than 2 standard errors above chance in step 1: Shapley
#    mass is v(N) - v(empty), and on a task at chance there is none to share out
cornerstone score "$model" --method shapley --estimator kernel --granularity sublayer --budget "$budget" \
  --tasks "$shapley_tasks" --limit 20 --seed 0 --dtype bfloat16 \
  --out "$out/$model-shapley.json"
if [ "$model" = smollm2-135m ]; then
  # 2b. the same on the paper's six tasks, where SmolLM2 is within 0.04 of chance overall
  cornerstone score "$model" --method shapley --estimator kernel --granularity sublayer --budget "$budget" \
    --tasks cornerstone_paper --limit 20 --seed 0 --dtype bfloat16 \
    --out "$out/$model-shapley-paper6.json"
fi

# 3. one-pass proxies (float32, calibrated on the sweep's documents, whose full-model float32 scores
#    they record: the reference for the bf16 runs), their agreement with ablation and Shapley, and
#    retention after dropping each method's bottom 25% of blocks (exported, then evaluated with
#    lm-eval on held-out documents)
python bench/proxy_fidelity.py --model "$model" --truth "$out/$model-ablation.json" --truth "$out/$model-shapley.json" \
  --eval-limit "$eval_limit" --eval-seed 1 --eval-dtype bfloat16 --batch-size 8 --prefix "$out/$model"

# 4. Spearman/Kendall, bottom-set overlap and cornerstones per sublayer (ablation, Shapley, sublayer cosine)
cornerstone compare "$out/$model-ablation.json" "$out/$model-shapley.json" "$out/$model-cosine.json" \
  --out "$out/$model-compare-sublayer.json"

# 5. the claims table
python bench/paper_claims.py "$model" --folder "$out"
