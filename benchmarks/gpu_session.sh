#!/usr/bin/env bash
# What a lent, offline GPU machine runs (see benchmarks/README.md): install the wheels the image
# lacks, then benchmarks/gpu_check.py on data brought along, then (optionally) GPU training.
#
#   bash benchmarks/gpu_session.sh check            # gpu_check.py on .gpu-data/minimix
#   bash benchmarks/gpu_session.sh train MINUTES    # benchmarks/train_bundled.sh on .gpu-data/manyvoices
#   bash benchmarks/gpu_session.sh all [SECONDS]    # check, then train until SECONDS (default 560) have
#                                                   # passed, then pack the runs' latest checkpoints
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
what=${1:-check}
case "$what" in
    check)
        out=${OUT:-benchmarks/results}/gpu_check
        python3 benchmarks/gpu_check.py --data .gpu-data/minimix --out "$out" "${@:2}"
        ;;
    train)
        bash benchmarks/train_bundled.sh "${2:-4}" "${OUT:-benchmarks/results}/train_bundled"
        ;;
    all)
        budget=${2:-560}
        out=${OUT:-benchmarks/results}
        python3 benchmarks/gpu_check.py --data .gpu-data/minimix --out "$out/gpu_check" --steps 120 --recipe-timeout 180 || true
        left=$((budget - SECONDS - 45))
        if [ "$left" -ge 60 ]; then
            minutes=$(python3 -c "print(round($left / 60, 2))")
            echo "[gpu_session] training for $minutes min"
            bash benchmarks/train_bundled.sh "$minutes" /tmp/train_bundled || true
            # what comes back: the recipe folders with their latest checkpoint only (resumable;
            # export the model folders from them), in 15 MiB pieces
            items=()
            for run in diffsep ctn; do
                d=/tmp/train_bundled/$run
                [ -d "$d" ] || continue
                last=$(ls -d "$d"/save/CKPT+* 2>/dev/null | sort | tail -1)
                items+=("$run.log" "$run/hyperparams.yaml" "$run/train_log.txt" "$run/log.txt" "$run/env.log")
                for f in "$d"/save/*.csv; do [ -e "$f" ] && items+=("$run/save/$(basename "$f")"); done
                [ -n "$last" ] && items+=("$run/save/$(basename "$last")")
            done
            (cd /tmp/train_bundled && tar cf - --ignore-failed-read "${items[@]}" 2>/dev/null) | split -b 15m - "$out/train_bundled.tar.part-"
            ls -la "$out"
        fi
        ;;
    *)
        echo "error: unknown action $what; use check or train" >&2
        exit 2
        ;;
esac
