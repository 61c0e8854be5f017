#!/usr/bin/env bash
# The runs behind BENCHMARKS.md §4 (issue 15), one after the other (never two at once on 2 cores).
# Each writes results.json / curves.csv / a plot under $OUT/<name>; the ablation tables come from
#   python benchmarks/ablation_table.py $OUT/<name>/results.json
# Total: about 100 minutes of wall clock on 2 cores. Usage: bash benchmarks/speed_study.sh [OUT] [STEP...]
set -euo pipefail
OUT=${1:-speed-study}; shift || true
STEPS=${*:-"ablation-timeseries ablation-image ablation-latent timeseries image latent flow"}
run() { local name=$1; shift; echo "== $name: snopt-dyn compare $*"; snopt-dyn compare "$@" --out "$OUT/$name"; }
for step in $STEPS; do
  case $step in
    # 3 seeds, SNOpt variants interleaved with the baselines
    ablation-timeseries) run "$step" --task timeseries --seeds 3 --budget 30 --eval-points 12 --optimizers \
      "snopt[schedule=constant],snopt[schedule=cosine],snopt[schedule=constant;kl_clip=0.02],snopt[schedule=cosine;kl_clip=0.02],adamw-cosine,soap" ;;
    ablation-image) run "$step" --task image --max-test 500 --seeds 3 --budget 30 --optimizers \
      "snopt[schedule=constant],snopt[schedule=cosine],snopt[schedule=cosine;momentum=0.9]@0.01,adamw-cosine,soap" ;;
    ablation-latent) run "$step" --task latent --seeds 3 --budget 30 --optimizers \
      "snopt[schedule=constant;rest=sgd],snopt[schedule=cosine;rest=sgd],snopt[schedule=cosine;rest=adam],adam,adamw-cosine,soap" ;;
    # 5 seeds, the shipped defaults against the baselines
    timeseries) run "$step" --task timeseries --seeds 5 --optimizers snopt,adamw-cosine,soap,adam ;;
    image) run "$step" --task image --max-test 500 --seeds 5 --optimizers "snopt,snopt[update_freq=20],adamw-cosine,soap,adam" ;;
    latent) run "$step" --task latent --seeds 5 --optimizers snopt,adamw-cosine,soap,adam ;;
    flow) run "$step" --task flow --seeds 5 --max-test 1000 --eval-points 12 --optimizers snopt,adamw-cosine,soap,adam ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
