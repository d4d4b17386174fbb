#!/usr/bin/env bash
# What a lent, offline GPU machine runs (see benchmarks/README.md): install the wheels the image
# lacks, then benchmarks/gpu_check.py on data brought along, then (optionally) GPU training.
#
#   bash benchmarks/gpu_session.sh check            # gpu_check.py on .gpu-data/minimix
#   bash benchmarks/gpu_session.sh train MINUTES    # benchmarks/train_bundled.sh on .gpu-data/manyvoices
#   bash benchmarks/gpu_session.sh all [SECONDS]    # check, then train until SECONDS (default 560) have
#                                                   # passed, then pack the runs' latest checkpoints
#   bash benchmarks/gpu_session.sh speedtrain [SECONDS]  # ncsnpp_call_speed.py instead of the check, then train
#   bash benchmarks/gpu_session.sh resume [SECONDS]      # same warm machine: train on, pack again
# Training options for both runs: EXTRA="--batch_size=24 ..." (passed to train.py).
#
# Expects: .whl/*.whl (the cp312 wheels of ../shared/gpu-wheels), .gpu-data/minimix (a MiniMix made
# on a machine with flite: recipes/MiniMix/generate_minimix.py --n-train 96 --n-valid 4 --n-test 8
# --max-seconds 3) and, for train, .gpu-data/manyvoices (recipes/ManyVoices). Reports go to $OUT
# (or benchmarks/results/ when $OUT is unset).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import speechbrain, hyperpyyaml, soundfile" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Train both runs of train_bundled.sh in /tmp/train_bundled until $1 seconds of this script have
# passed, then pack what comes back into $2: the recipe folders with their latest checkpoint only
# (resumable; export the model folders from them), in 15 MiB pieces.
train_until() {
    local budget=$1 out=$2
    local left=$((budget - SECONDS - 45))
    [ "$left" -ge 60 ] || { echo "[gpu_session] no time left to train"; return 0; }
    local minutes
    minutes=$(python3 -c "print(round($left / 60, 2))")
    echo "[gpu_session] training for $minutes min"
    bash benchmarks/train_bundled.sh "$minutes" /tmp/train_bundled || true
    local items=() run d last f
    for run in diffsep ctn; do
        d=/tmp/train_bundled/$run
        [ -d "$d" ] || continue
        last=$(ls -d "$d"/save/CKPT+* 2>/dev/null | sort | tail -1)
        items+=("$run.log" "$run/hyperparams.yaml" "$run/train_log.txt" "$run/log.txt" "$run/env.log")
        for f in "$d"/save/*.csv; do [ -e "$f" ] && items+=("$run/save/$(basename "$f")"); done
        [ -n "$last" ] && items+=("$run/save/$(basename "$last")")
    done
    mkdir -p "$out"
    (cd /tmp/train_bundled && tar cf - --ignore-failed-read "${items[@]}" 2>/dev/null) | split -b 15m - "$out/train_bundled.tar.part-"
    ls -la "$out"
}
what=${1:-check}
case "$what" in
    check)
        out=${OUT:-benchmarks/results}/gpu_check
        python3 benchmarks/gpu_check.py --data .gpu-data/minimix --out "$out" "${@:2}"
        ;;
    train)
        bash benchmarks/train_bundled.sh "${2:-4}" "${OUT:-benchmarks/results}/train_bundled"
        ;;
    all|speedtrain)
        budget=${2:-560}
        out=${OUT:-benchmarks/results}
        if [ "$what" = all ]; then
            python3 benchmarks/gpu_check.py --data .gpu-data/minimix --out "$out/gpu_check" --steps 120 --recipe-timeout 180 || true
        else  # the call-latency settings of benchmarks/ncsnpp_call_speed.py instead of the whole check
            python3 benchmarks/ncsnpp_call_speed.py --out "$out/ncsnpp_call_speed" || true
        fi
        train_until "$budget" "$out"
        ;;
    resume)  # on the same (warm) machine: train on in /tmp/train_bundled until SECONDS, pack again
        train_until "${2:-200}" "${OUT:-benchmarks/results}"
        ;;
    *)
        echo "error: unknown action $what; use check, train, all, speedtrain or resume" >&2
        exit 2
        ;;
esac
