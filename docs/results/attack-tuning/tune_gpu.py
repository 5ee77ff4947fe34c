"""Attack-model tuning grid on the device: answers of 'none' and 'pp' for the 10k Fashion-MNIST
queries of seed 0, then many trainings in parallel worker processes; accuracy on the MNIST test set."""

import json
import math
import os
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.getcwd())
OUT = os.environ.get("OUT", "/tmp")


def answers(dev):
    from deepdefense.defense.loader import load_defense

    d = torch.load(".tune/data.pt")
    q = d["queries"].float().div(255).to(dev)
    res = {}
    for name in ("none", "pp"):
        defense, _ = load_defense("lenet-mnist", name, device=dev)
        P, L, M = [], [], []
        for c in q.split(500):
            a = defense.answer(c)
            P += [x.probabilities.float() for x in a]
            L += [x.label for x in a]
            M += [x.attribution.float() for x in a]
        res[name] = {"p": torch.stack(P).cpu(), "y": torch.tensor(L), "m": torch.stack(M).cpu()}
    torch.save(res, "/tmp/answers.pt")


def run(cfg):
    from deepdefense.clients.attack_losses import attack_loss
    from deepdefense.clients.attack_model import build_attack_model
    from deepdefense.defense.interpreters import create_interpreter

    dev = torch.device("cuda")
    d = torch.load(".tune/data.pt")
    A = torch.load("/tmp/answers.pt")[cfg.get("defense", "none")]
    B = cfg.get("budget", 10000)
    x = d["queries"][:B].float().div(255).to(dev)
    p = A["p"][:B].to(dev)
    y = A["y"][:B].to(dev)
    m = A["m"][:B].to(dev)
    tx = d["test_x"].float().div(255).to(dev)
    ty = d["test_y"].to(dev)
    mean, std = ((0.1307,), (0.3081,)) if cfg.get("norm") == "mnist" else ((0.2860,), (0.3530,))
    seed = cfg.get("seed", 0)
    model = build_attack_model("lenet", 10, (1, 28, 28), mean, std, seed).to(dev)
    interp = create_interpreter("gradcam", model, (1, 28, 28))
    bs, E = cfg["bs"], cfg["epochs"]
    steps = E * math.ceil(B / bs)
    wd = cfg.get("wd", 0.0)
    if cfg["opt"] == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=wd)
    elif cfg["opt"] == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=wd)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9, nesterov=True, weight_decay=wd)
    sch = {
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps),
        "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps),
        "none": lambda: None,
    }[cfg.get("sched", "none")]()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    curve = []
    t0 = time.time()
    for ep in range(E):
        model.train()
        for idx in torch.randperm(B, generator=g).split(bs):
            idx = idx.to(dev)
            loss = attack_loss(cfg["loss"], model, interp, x[idx], y[idx], p[idx], m[idx], cfg.get("lam", 0.0))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sch:
                sch.step()
        if (ep + 1) % cfg.get("every", 10) == 0 or ep + 1 == E:
            model.eval()
            with torch.no_grad():
                acc = float((model(tx).argmax(1) == ty).float().mean() * 100)
            curve.append((ep + 1, round(acc, 2)))
    rec = {**cfg, "curve": curve, "final": curve[-1][1], "s": round(time.time() - t0, 1)}
    print(json.dumps(rec), flush=True)
    return rec


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        grid = json.load(fh)
    answers("cuda")
    mp.set_start_method("spawn")
    with mp.Pool(int(sys.argv[2]) if len(sys.argv) > 2 else 12) as pool:
        recs = pool.map(run, grid, chunksize=1)
    with open(f"{OUT}/{os.path.basename(sys.argv[1])}.out.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in recs)
