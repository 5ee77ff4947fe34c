#!/bin/bash
# docs/own-model.md end to end: a LeNet trained on MNIST by a plain PyTorch script (not deepdefense train),
# prepared from its state dict and description, served defended, and measured by an honest client sending MNIST
# test digits and one sending Fashion-MNIST test images (out of domain: the gate's misinformation).
set -e
cd "$(dirname "$0")/../../.."
work=${WORK:-/tmp/own-model}
export OMP_NUM_THREADS=1
python docs/examples/train_outside.py --data-root ../shared/data --out "$work" > "$work.train.log" 2>&1
python -m deepdefense.cli prepare --from "$work/model.toml" --checkpoint "$work/lenet-own" --data-root ../shared/data \
  > "$work/prepare.log" 2>&1
cp "$work"/lenet-own.prepare/{report.json,report.md,domain.json} docs/results/own-model/
python -m deepdefense.cli serve --checkpoint "$work/lenet-own.json" --port 18791 > "$work/serve.log" 2>&1 &
pid=$!
for i in $(seq 1 300); do curl -sf localhost:18791/readyz >/dev/null && break; sleep 1; done
curl -s localhost:18791/v1/models > docs/results/own-model/models.json
for data in mnist fashionmnist; do
  python -m deepdefense.cli client --url http://127.0.0.1:18791 --checkpoint "$work/lenet-own.json" --dataset $data \
    --data-root ../shared/data --n 1000 --batch-size 16 --no-explain --quiet --out docs/results/own-model/client-$data.json \
    > "$work/client-$data.log"
done
kill $pid; wait $pid 2>/dev/null || true
