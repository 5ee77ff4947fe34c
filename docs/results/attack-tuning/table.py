"""Print the tuning runs of grid*.out.jsonl as a Markdown table (python docs/results/attack-tuning/table.py)."""

import json
from pathlib import Path

here = Path(__file__).parent
print(
    "| grid | defense | loss | λ | optimizer | lr | batch | schedule | wd | epochs | B | seed | normalisation "
    "| accuracy at epochs 10, 20, … | final |"
)
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for path in sorted(here.glob("grid*.out.jsonl")):
    for line in path.read_text().splitlines():
        r = json.loads(line)
        lam = r.get("lam", 0) if r["loss"] == "explanations" else "—"
        curve = ", ".join(f"{a:.2f}" for _, a in r["curve"])
        norm = "MNIST (the victim's)" if r.get("norm") == "mnist" else "Fashion-MNIST"
        print(
            f"| {path.name.split('.')[0]} | {r.get('defense', 'none')} | {r['loss']} | {lam} | {r['opt']} "
            f"| {r['lr']:g} | "
            f"{r['bs']} | {r.get('sched', 'none')} | {r.get('wd', 0):g} | {r['epochs']} | {r.get('budget', 10000)} | "
            f"{r.get('seed', 0)} | {norm} | {curve} | "
            f"**{r['final']:.2f}** |"
        )
