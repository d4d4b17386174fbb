#!/bin/bash
# four models, one process each, 1 thread each, side by side on the 2 cores, 15 training minutes each
cd "$(dirname "$0")/../../.."
OUT=${OUT:-runs/side}
rm -rf $OUT; mkdir -p $OUT
for spec in diffsep_small=diffsep_small.yaml diffsep_small_paper=diffsep_small_paper.yaml diffsep_small_edm=diffsep_small_edm.yaml convtasnet_small=convtasnet_small.yaml; do
  label=${spec%%=*}
  OMP_NUM_THREADS=1 python benchmarks/learn_minimix.py --minutes 15 --points 3 --data ${DATA:-data/minimix} \
     --out $OUT/$label --n-eval 8 --eval-steps 5 --threads 1 --model $spec > $OUT/$label.log 2>&1 &
done
wait
python benchmarks/learn_minimix.py --merge $OUT/*/learning_curves.json --out $OUT/merged --minutes 15 --n-eval 8
