#!/usr/bin/env bash
# The prior-mismatch comparison (issue: DiffSep that gets better with more steps), as it was run on the
# 2-core development machine. DATA: a MiniMix made with
#   python recipes/MiniMix/generate_minimix.py --out DATA --n-train 1000 --n-valid 40 --n-test 40 --seed 0 --max-seconds 4
set -euo pipefail
cd "$(dirname "$0")/../../.."
DATA=${DATA:-data/minimix}
RUNS=${RUNS:-runs/prior_mismatch}
OUT=benchmarks/results/prior_mismatch

# 1. the three training variants, 50 training minutes each, run side by side (one process and one
#    torch thread each, sharing the two cores); SI-SDRi of 8 held-out mixtures every 10 minutes
python benchmarks/learn_minimix.py --minutes 50 --points 5 --data "$DATA" --out "$RUNS/diffsep_small" --n-eval 8 \
    --eval-steps 3 --threads 1 --save --model diffsep_small=diffsep_small.yaml &
python benchmarks/learn_minimix.py --minutes 50 --points 5 --data "$DATA" --out "$RUNS/diffsep_small_mismatch" --n-eval 8 \
    --eval-steps 3 --threads 1 --save \
    --model "diffsep_small_mismatch=diffsep_small.yaml@{loss_options: {objective: denoiser, p_T: 0.3, pit_above: 0.5, mismatch_p: 0.5, mismatch_above: 0.5}}" &
python benchmarks/learn_minimix.py --minutes 50 --points 5 --data "$DATA" --out "$RUNS/flow_small" --n-eval 8 \
    --eval-steps 4 --threads 1 --save --model flow_small=flow_small.yaml &
wait
python benchmarks/learn_minimix.py --merge "$RUNS"/*/learning_curves.json --minutes 50 --n-eval 8 --out "$OUT/learning"

# 2. export each, then SI-SDRi (8 test mixtures) against NFE for the three 50-minute models
for m in diffsep_small diffsep_small_mismatch flow_small; do
    python -m speechbrain_diffsep.export --from-recipe "$RUNS/$m/$m" --ckpt last --out "$RUNS/models/$m"
done
TEST_CSV="$RUNS/diffsep_small/diffsep_small/save/test.csv"
SQ="python benchmarks/sampler_quality.py --problem model --data $TEST_CSV --n-utts 8"
for m in diffsep_small diffsep_small_mismatch; do
    $SQ --model "$RUNS/models/$m" --samplers ddim --nfe 1 5 20 60 --out "$OUT/side_by_side/$m"
    $SQ --model "$RUNS/models/$m" --samplers ddim@restart_t=0.5 --nfe 2 60 --out "$OUT/side_by_side/${m}_restart"
    $SQ --model "$RUNS/models/$m" --samplers pc --steps 30 --out "$OUT/side_by_side/${m}_pc"
done
$SQ --model "$RUNS/models/flow_small" --samplers euler --nfe 1 2 5 20 60 --out "$OUT/side_by_side/flow_small"
$SQ --model "$RUNS/models/flow_small" --samplers euler@restart_t=0.5 --nfe 2 20 60 --out "$OUT/side_by_side/flow_small_restart"

# 3. the shipped model (pretrained/diffsep-small-minimix, 60 minutes with 2 threads on an idle machine):
#    SI-SDRi, PESQ, ESTOI, DNSMOS OVRL against NFE on 10 test mixtures, and the default vs one call on 40
python benchmarks/sampler_quality.py --problem model --model pretrained/diffsep-small-minimix --data "$TEST_CSV" \
    --n-utts 10 --pesq --dnsmos --samplers ddim@restart_t=null ddim@restart_t=0.5 --out "$OUT/bundled_diffsep_small"
python benchmarks/sampler_quality.py --problem model --model pretrained/diffsep-small-minimix --data "$TEST_CSV" \
    --n-utts 10 --pesq --dnsmos --samplers pc@restart_t=null pc@restart_t=0.5 --steps 30 --out "$OUT/bundled_diffsep_small_pc"
python benchmarks/sampler_quality.py --problem model --model pretrained/diffsep-small-minimix --data "$TEST_CSV" \
    --n-utts 40 --pesq --dnsmos --samplers ddim@restart_t=0.5 ddim@restart_t=null --steps 1 --out "$OUT/bundled_40"
python benchmarks/sampler_quality.py --problem model --model pretrained/diffsep-small-minimix --data "$TEST_CSV" \
    --n-utts 10 --pesq --dnsmos --samplers ode@restart_t=0.5 edm@restart_t=0.5 "edm@restart_t=0.5,churn=1.0" \
    --nfe 10 20 --out "$OUT/bundled_other_samplers"
