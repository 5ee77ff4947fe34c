"""Run-to-run spread: the first H100 run's accuracies (first-run-accuracy.csv) against the committed
run's (docs/results/mnist/accuracy.csv), as a Markdown table.

    python docs/results/attack-tuning/compare_runs.py
"""

import csv
from pathlib import Path

here = Path(__file__).parent


def read(path: Path) -> dict[tuple[str, str, int], float]:
    with open(path) as fh:
        return {(r["defense"], r["loss"], int(r["budget"])): float(r["accuracy"]) for r in csv.DictReader(fh)}


first, second = read(here / "first-run-accuracy.csv"), read(here.parent / "mnist" / "accuracy.csv")
print("| defense | attacker | B | first run | committed run | difference |")
print("| --- | --- | --- | --- | --- | --- |")
diffs = []
for key in sorted(first):
    if key in second:
        d = second[key] - first[key]
        diffs.append(abs(d))
        print(f"| {key[0]} | `{key[1]}` | {key[2]:,} | {first[key]:.2f} | {second[key]:.2f} | {d:+.2f} |")
print(f"\nmean |difference| {sum(diffs) / len(diffs):.2f} points, largest {max(diffs):.2f} ({len(diffs)} cells)")
