#!/usr/bin/env bash
# Train the ManyVoices models of the bundles for a fixed wall-clock time on one GPU, side by side:
#   diffsep  recipes/WSJ0Mix/separation/hparams/diffsep_tcn_dm.yaml   (DiffSep, from the prior)
#   ctn      recipes/WSJ0Mix/separation/hparams/convtasnet_dm.yaml    (Conv-TasNet baseline)
# Both use dynamic mixing and per-source augmentation on a ManyVoices folder (recipes/ManyVoices).
# Each run is stopped after MINUTES (SIGTERM; intra-epoch checkpoints every $CKPT_STEPS=500 steps), its latest
# checkpoint exported to OUT/<run>/model; the recipe output folders stay in OUT, so the same
# command with the same OUT resumes training where it stopped.
#
#   bash benchmarks/train_bundled.sh MINUTES OUT [DATA]       (DATA default .gpu-data/manyvoices)
#   EXTRA="--N=16 --B=8 --H=16 --X=2 --R=1 --num_workers=1" CKPT_STEPS=3 bash ... 2 /tmp/t DATA  (CPU smoke test)
set -uo pipefail
cd "$(dirname "$0")/.."
MIN=${1:?minutes (may be fractional)}; OUT=${2:?output folder}; DATA=${3:-.gpu-data/manyvoices}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
DEV=cuda; python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || DEV=cpu
R=recipes/WSJ0Mix/separation
run() {  # name yaml extra...
    local name=$1 yaml=$2; shift 2
    timeout -s TERM -k 20 "${MIN}m" python3 $R/train.py $R/hparams/$yaml --data_folder="$DATA" \
        --output_folder="$OUT/$name" --device=$DEV --precision=bf16 --ckpt_interval_minutes=0 \
        --ckpt_interval_steps="${CKPT_STEPS:-500}" \
        --noprogressbar "$@" >"$OUT/$name.log" 2>&1
    echo "[train_bundled] $name exited $? after ${MIN} min budget"
}
run diffsep diffsep_tcn_dm.yaml ${EXTRA:-} &
run ctn convtasnet_dm.yaml ${EXTRA:-} &
wait
for name in diffsep ctn; do
    rm -rf "$OUT/$name/model"
    python3 -m speechbrain_diffsep.export --from-recipe "$OUT/$name" --ckpt last --out "$OUT/$name/model" \
        || echo "[train_bundled] export of $name failed"
    grep -h "epoch:" "$OUT/$name/train_log.txt" 2>/dev/null | tail -3
done
