#!/usr/bin/env bash
# Rebuild pretrained/diffsep-minimix from the two MiniMix training runs (see its README.md):
#   CTN_RUN      output folder of   train.py hparams/convtasnet_small.yaml
#   DIFFSEP_RUN  output folder of   train.py hparams/diffsep_small_edm.yaml (+ the refiner fine-tuning)
# Usage: bash pretrained/make_minimix_bundle.sh CTN_RUN DIFFSEP_RUN [T_START] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
CTN_RUN=$1; DIFFSEP_RUN=$2; T_START=${3:-0.2}; STEPS=${4:-2}
OUT=pretrained/diffsep-minimix
rm -rf "$OUT"
python -m speechbrain_diffsep.export --from-recipe "$DIFFSEP_RUN" --ckpt last --out "$OUT"
python -m speechbrain_diffsep.export --from-recipe "$CTN_RUN" --ckpt best --out "$OUT/convtasnet"
# refiner configuration: Conv-TasNet first, then DiffSep from t_start with the ODE sampler
python - "$OUT/hyperparams.yaml" "$T_START" "$STEPS" <<'PY'
import re, sys
path, t_start, steps = sys.argv[1], sys.argv[2], sys.argv[3]
s = open(path).read()
s = re.sub(r"(?m)^sampler: .*$", "sampler: ode          # probability-flow ODE, Heun (+1 final denoising call)", s)
s = re.sub(r"(?m)^num_steps: .*$", f"num_steps: {steps}         # {2 * (int(steps) - 1) + 1} network calls", s)
s = re.sub(r"(?ms)^sampler_options:.*?\n(?=\S)", "sampler_options: {}\n", s)
s += (
    "\n# ------------------------------------------------------------------ refiner mode\n"
    "# The sources are first estimated by the Conv-TasNet in convtasnet/ (ConvTasNetSeparation);\n"
    "# DiffSep then starts its reverse process at t_start around that estimate.\n"
    "init_separator: convtasnet\n"
    f"t_start: {t_start}\n"
)
open(path, "w").write(s)
PY
cp "$CTN_RUN/train_log.txt" "$OUT/train_log_convtasnet.txt"
cp "$DIFFSEP_RUN/train_log.txt" "$OUT/train_log_diffsep.txt"
du -sh "$OUT"
