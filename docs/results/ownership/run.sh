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
# B = 10,000 (victim-train): the harness extended the stored set (stopped by hand once it held 10,000 queries,
# before it trained anything of its own); f and g are the first study on it, with the count test alone
deepdefense eval --data-root "${DD_DATA_ROOT:-../shared/data}" --defenses --gated deepdefense --monitored \
    --query-sets victim-train --jbda-seeds 150 --losses labels --budgets 10000 --benign-n 0 --avg-drop --cs --top-k \
    --store-root runs/transfer-sets --out /tmp/collect --quiet
own --out docs/results/ownership/f.json --steps copies --query-sets victim-train --budget 10000 --losses labels probabilities &
own --out docs/results/ownership/g.json --steps copies --query-sets victim-train --budget 10000 --losses explanations &
wait
# The rank test (server/watermark.py ownership_test): every copy and independent model measured again, so that
# each carries both tests (the same seeds and selections: the counts are a-g's); the fraction's sweep for every
# thief, and five keys per fraction (five draws of the hash) for the two weakest JBDA thieves
own --out docs/results/ownership/copies.json --steps copies --query-sets jbda victim-train &
own --out docs/results/ownership/independent.json --steps independent &
own --out docs/results/ownership/sweep.json --steps sweep --sweep-sets jbda victim-train \
    --sweep-losses labels probabilities explanations --fractions 0.0025 0.005 &
wait
for loss in explanations probabilities; do
    own --out docs/results/ownership/sweep-$loss.json --steps sweep --sweep-sets jbda --sweep-losses $loss \
        --fractions 0.0025 0.005 0.01 --sweep-keys 5 &
done
wait
# B = 10,000 with the rank test: the victim-train set extended again to 10,000 (the one f and g used was no longer
# stored) and a JBDA set of 10,000 collected through today's default server with keys, each named with --stored
deepdefense eval --data-root "${DD_DATA_ROOT:-../shared/data}" --defenses --gated deepdefense --monitored \
    --query-sets victim-train --jbda-seeds 150 --losses labels --budgets 10000 --benign-n 0 --avg-drop --cs --top-k \
    --store-root runs/transfer-sets --out /tmp/collect-vt --quiet
# (its record, and the key's monitor summary, copied to docs/results/gate-aware-victim-train-10000: the labels thief
# trained on those 10,000 answers, the in-domain ceiling at B = 10,000)
deepdefense eval --data-root "${DD_DATA_ROOT:-../shared/data}" --defenses --gated deepdefense --monitored \
    --query-sets jbda --jbda-seeds 150 --losses probabilities labels --budgets 10000 --benign-n 0 --avg-drop --cs \
    --top-k --store-root runs/transfer-sets --out docs/results/gate-aware-jbda-10000 \
    --report docs/results/below-label-line-jbda-10000.md
VT=victim-train=lenet-mnist-deepdefense-random-mnist-3dedc7a23a0a
own --out docs/results/ownership/copies-10000.json --steps copies --query-sets victim-train --budget 10000 \
    --losses labels probabilities --stored $VT &
own --out docs/results/ownership/copies-10000-explanations.json --steps copies --query-sets victim-train \
    --budget 10000 --losses explanations --stored $VT &
own --out docs/results/ownership/copies-jbda-10000.json --steps copies --query-sets jbda --budget 10000 \
    --stored jbda=lenet-mnist-deepdefense-jbda-mnist-8251ba004a15 &
wait
# Two fractions (server/watermark.py: FRACTION 0.4% until the monitor escalates a key, ESCALATED_FRACTION 1% after;
# the monitor replayed over each thief's queries, measure/ownership.py monitored_escalation): the honest cost, every
# copy with its fine-tuning and pruning, four more draws of the hash for every thief, and the independent models
own --out docs/results/ownership/escalated.json --steps cost copies --fractions 0.004 --query-sets victim-train jbda &
own --out docs/results/ownership/escalated-sweep.json --steps sweep --fractions 0.004 --sweep-keys 5 \
    --sweep-sets jbda victim-train --sweep-losses labels probabilities explanations &
wait
own --out docs/results/ownership/escalated-independent.json --steps independent --fractions 0.004
own --out docs/results/ownership/escalated-cost.json --steps cost --fractions 0.0025 0.004 0.005 0.01
python -m deepdefense.measure.ownership --report docs/results/ownership/a.json docs/results/ownership/b.json \
    docs/results/ownership/c.json docs/results/ownership/d.json docs/results/ownership/e.json \
    docs/results/ownership/f.json docs/results/ownership/g.json docs/results/ownership/copies.json \
    docs/results/ownership/independent.json docs/results/ownership/sweep.json \
    docs/results/ownership/sweep-explanations.json docs/results/ownership/sweep-probabilities.json \
    docs/results/ownership/copies-10000.json docs/results/ownership/copies-10000-explanations.json \
    docs/results/ownership/copies-jbda-10000.json docs/results/ownership/escalated.json \
    docs/results/ownership/escalated-sweep.json docs/results/ownership/escalated-independent.json \
    docs/results/ownership/escalated-cost.json > docs/results/ownership.md
