"""Several models in one server (issue 33's target): one server serving ``lenet-mnist`` and
``lenet-fashionmnist`` answers each model's test images at the model's own accuracy, through ``/predict``
(the body's ``"model"``) and the Open Inference Protocol (``/v2/models/{name}/infer``).

``python -m deepdefense.measure.multi_model --data-root DIR --n 1000 --out docs/results/multi-model.json
--report docs/results/multi-model.md``: one server on loopback in this process with both checkpoints, as
``deepdefense serve --checkpoint lenet-mnist --checkpoint lenet-fashionmnist`` builds it (the default
defense, the gate where the checkpoint ships it, an API key, so the monitor watches the gated model); each
model's first ``n`` test images through both routes, in requests of 16 with maps, by
:func:`clients.benign.run_benign` (the ``deepdefense client`` of ``--model NAME --protocol predict|v2``).
Then, for the model's own accuracy, a server of that model alone with the same settings gets the same images
through ``/predict``. Beside them: the undefended checkpoint's accuracy on the same images and the accuracy
its metadata records on the whole test set."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepdefense.clients.benign import run_benign
from deepdefense.clients.oracle import HttpOracle
from deepdefense.common.provenance import provenance
from deepdefense.defense.api import NoDefense
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.measure.launcher import served
from deepdefense.measure.markdown import document, module_command, table
from deepdefense.models.checkpoint import load_checkpoint
from deepdefense.models.data import default_data_root, load_split

CHECKPOINTS = ("lenet-mnist", "lenet-fashionmnist")
DEFENSE, INTERPRETER = "deepdefense", "gradcam"
BATCH = 16
#: The report's columns: the served runs, then the undefended and recorded accuracies.
RUNS = ("together_predict", "together_v2", "alone_predict")
ACCURACIES = ("undefended_accuracy", "checkpoint_test_accuracy")


def run_multi_model(n: int, data_root: str | None) -> dict[str, Any]:
    tests, undefended = {}, {}
    for name in CHECKPOINTS:
        model, meta = load_checkpoint(name)
        model.requires_grad_(False)
        undefended[name] = (NoDefense(model, create_interpreter(INTERPRETER, model, tuple(meta.input_shape))), meta)
        tests[name] = tuple(t[:n] for t in load_split(meta.dataset, data_root, "test").tensors)

    def client(url: str, key: str, name: str, protocol: str) -> dict[str, Any]:
        images, labels = tests[name]
        with HttpOracle(url, key, model=name, protocol=protocol, max_instances=BATCH) as oracle:
            report = run_benign(oracle, images, labels, undefended[name][0], batch_size=BATCH, progress=False)
        return {k: v for k, v in report.as_dict().items() if k in ("n", "accuracy", "agreement_undefended")}

    together: dict[str, dict[str, Any]] = {}
    with served(list(CHECKPOINTS), DEFENSE, INTERPRETER, gate="auto", data_root=data_root) as (url, key):
        for name in CHECKPOINTS:
            together[name] = {protocol: client(url, key, name, protocol) for protocol in ("predict", "v2")}
            print(name, json.dumps(together[name]), flush=True)
    rows = []
    for name in CHECKPOINTS:
        with served(name, DEFENSE, INTERPRETER, gate="auto", data_root=data_root) as (url, key):
            alone = client(url, key, name, "predict")
        images, labels = tests[name]
        victim = [a.label for a in undefended[name][0].answer(images, explain=False)]
        raw = 100.0 * sum(int(v == y) for v, y in zip(victim, labels.tolist(), strict=True)) / len(labels)
        row = {"model": name, "n": len(labels), **{f"together_{p}": together[name][p] for p in ("predict", "v2")}}
        checkpoint = undefended[name][1].test_accuracy
        rows.append(row | {"alone_predict": alone, "undefended_accuracy": raw, "checkpoint_test_accuracy": checkpoint})
        print(json.dumps(rows[-1]), flush=True)
    return {"checkpoints": list(CHECKPOINTS), "defense": DEFENSE, "batch": BATCH, "models": rows}


def markdown(result: dict[str, Any], command: str) -> str:
    m = result["measured"]
    cell = lambda run: f"{run['accuracy']:.2f} (agreement {run['agreement_undefended']:.2f})"

    lines = [
        "# Several models in one server",
        "",
        "Issue 33's target: one server serving `lenet-mnist` and `lenet-fashionmnist` answers each model's test "
        "images at the model's own accuracy, through `/predict` (the body's `\"model\"`) and the Open Inference "
        "Protocol (`/v2/models/{name}/infer`).",
        "",
        f"Command: `{command}` (commit {m['commit']}{' with uncommitted changes' if m['dirty'] else ''}, "
        f"{m['date']}; {result['machine']}).",
        "",
        f"One server with both checkpoints, defense `{result['defense']}`, the gate where the checkpoint ships it "
        "(lenet-mnist), an API key (so the monitor watches the gated model), as `deepdefense serve --checkpoint "
        "lenet-mnist --checkpoint lenet-fashionmnist` builds it; each model's first n test images in requests of "
        f"{result['batch']} with maps. *Alone*: a server of that model only, with the same settings, the same "
        "images through `/predict`. Accuracy in percent of the n images; agreement: answers whose label is the "
        "undefended checkpoint's.",
        "",
        *table(
            "model | n | together, /predict | together, /v2 | alone, /predict | undefended, same images | "
            "checkpoint, whole test set",
            (
                (r["model"], r["n"], *(cell(r[k]) for k in RUNS), *(f"{r[k]:.2f}" for k in ACCURACIES))
                for r in result["models"]
            ),
        ),
    ]
    n = result["models"][0]["n"]
    answers = 3 * n * len(result["models"])
    lines += [
        "",
        "Each model answers at its own accuracy in the shared server, through both routes: the same accuracy and "
        "the same agreement with its undefended checkpoint as the server of the model alone (this run counts "
        "them; it does not compare the answers image by image). lenet-mnist's agreement is below 100% in every "
        "column alike; the run does not record which answers differ or why (of lenet-mnist's defense, the "
        "misinformation gate is the part that may change a label: it answers the queries its domain score flags "
        "from the misinformation model).",
        "",
        f"A subset of the test sets: the first {n:,} test images of each model ({answers:,} defended answers with "
        f"maps across the three servers and two routes, {result['minutes']:.0f} minutes on this machine); the whole "
        "test sets would take ten times as long.",
    ]
    return document(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=default_data_root(), help="data sets in torchvision's layout")
    parser.add_argument("--n", type=int, default=1000, help="test images per model (the first n)")
    parser.add_argument("--machine", default="", help="what it ran on, for the report")
    parser.add_argument("--out", type=Path, required=True, help="the result as JSON")
    parser.add_argument("--report", type=Path, required=True, help="the result as Markdown")
    args = parser.parse_args(argv)
    measured, started = provenance(), time.monotonic()  # the code that runs: the checkout as it is now
    result = run_multi_model(args.n, args.data_root)
    result |= {"minutes": (time.monotonic() - started) / 60, "machine": args.machine, "measured": measured}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.report.write_text(markdown(result, module_command("deepdefense.measure.multi_model", argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
