#!/bin/sh
# The watermark's evaluation (docs/results/ownership.md), from the repository root, with the evaluation's transfer
# sets under runs/transfer-sets (deepdefense eval --gated deepdefense --monitored --query-sets jbda victim-train
# --jbda-seeds 150 --budgets 2500: docs/results/below-label-line-in-domain.md). Seed 0 throughout (the default).
# As it was run: parallel processes on a shared 2-core machine, each writing its own file; each file lists the
# commands that wrote it. a-d ran while watermarked answers still carried a map recomputed for the watermark
# class (their "map" is TRIED in measure/ownership.py): labels and probabilities, and so the labels and
# probabilities thieves and the independent models, are the same either way; e reran what the map changes (the
# explanations thieves, the detectors) with the map the server sends. The report takes e's rows over a's and b's.
set -e
export OMP_NUM_THREADS=1
own() { python -m deepdefense.measure.ownership --data-root "${DD_DATA_ROOT:-../shared/data}" "$@"; }
own --out docs/results/ownership/a.json --steps cost sweep copies --query-sets victim-train &
own --out docs/results/ownership/b.json --steps copies --query-sets jbda &
wait
own --out docs/results/ownership/b.json --steps independent detectors --independent 1 5 &
own --out docs/results/ownership/c.json --steps sweep --sweep-sets jbda --sweep-losses probabilities --fractions 0.005 &
own --out docs/results/ownership/d.json --steps independent --independent 6 10 &
wait
own --out docs/results/ownership/e.json --steps copies detectors --query-sets victim-train jbda --losses explanations
# B = 10,000 (victim-train): the harness extends the stored set (stopped by hand once it held 10,000 queries,
# before it trained anything of its own), then the same study on it
deepdefense eval --data-root "${DD_DATA_ROOT:-../shared/data}" --defenses --gated deepdefense --monitored \
    --query-sets victim-train --jbda-seeds 150 --losses labels --budgets 10000 --benign-n 0 --avg-drop --cs --top-k \
    --store-root runs/transfer-sets --out /tmp/collect --quiet
own --out docs/results/ownership/f.json --steps copies --query-sets victim-train --budget 10000 --losses labels probabilities &
own --out docs/results/ownership/g.json --steps copies --query-sets victim-train --budget 10000 --losses explanations &
wait
python -m deepdefense.measure.ownership --report docs/results/ownership/a.json docs/results/ownership/b.json \
    docs/results/ownership/c.json docs/results/ownership/d.json docs/results/ownership/e.json \
    docs/results/ownership/f.json docs/results/ownership/g.json > docs/results/ownership.md
