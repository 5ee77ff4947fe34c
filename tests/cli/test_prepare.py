"""``deepdefense prepare``: the steps run in order through their own parsers, a step whose artifact loads against
the victim's weights is kept, a changed victim (or ``--redo``) makes a step and what depends on it again, and the
report says whether the misinformation gate can be on.

The steps' heavy work is replaced by fakes that write real artifacts cheaply (the shipped ``lenet-mnist``'s
companions re-saved for the victim under test, through the project's own writers); what is tested is prepare's
order, its checks (the loaders the server uses) and its report.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepdefense.cli import main
from deepdefense.commands import domain, edm, misinfo, sensitivity, warmstart
from deepdefense.defense.baselines.edm import load_ensemble, save_ensemble
from deepdefense.defense.domain import DomainMeta, DomainScore, MaxSoftmax, save_domain_score
from deepdefense.defense.misinformation import misinformation_path
from deepdefense.defense.warm_start import WarmStart, WarmStartMeta, save_warm_start, warm_start_paths
from deepdefense.measure.prepare_report import gate_verdict
from deepdefense.models.checkpoint import SHIPPED_DIR, build_model, load_checkpoint, read_meta, save_checkpoint

ORDER = ["sensitivity", "warmstart", "domain", "misinfo", "edm"]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The steps made, in order; each step's ``make`` replaced by a fake that writes a real artifact."""
    made: list[str] = []

    def recorded(name, fake):  # type: ignore[no-untyped-def]
        def make(args: argparse.Namespace) -> Path:
            made.append(name)
            return fake(args)

        return make

    for module, fake in (
        (sensitivity, _sensitivity),
        (warmstart, _warmstart),
        (domain, _domain),
        (misinfo, _misinfo),
        (edm, _edm),
    ):
        monkeypatch.setattr(module, "make", recorded(module.__name__.rsplit(".", 1)[-1], fake))
    return made


def _sensitivity(args: argparse.Namespace) -> Path:
    path = Path(args.checkpoint)
    meta = read_meta(path)
    shipped = read_meta(SHIPPED_DIR / "lenet-mnist.json").extra["sensitivity"]
    meta.extra["sensitivity"] = {**shipped, "seed": args.seed, "weights_sha256": meta.sha256}
    path.write_text(json.dumps(asdict(meta), indent=2))
    return path


def _warmstart(args: argparse.Namespace) -> Path:
    shipped = json.loads((SHIPPED_DIR / "lenet-mnist.warm.json").read_text())
    tensors = load_file(str(SHIPPED_DIR / "lenet-mnist.warm.safetensors"))
    dense = {k.removeprefix("dense/"): v for k, v in tensors.items() if k.startswith("dense/")}
    factors = {k[2:]: (v, tensors[f"v/{k[2:]}"]) for k, v in tensors.items() if k.startswith("u/")}
    keep = {k: shipped[k] for k in ("interpreter", "layers", "classes", "rank", "images", "dataset", "steps")}
    meta = WarmStartMeta(**keep, seed=args.seed, command=args.command_line, serve_steps=args.serve_steps)
    return save_warm_start(WarmStart(meta, dense, factors), args.checkpoint)


def _domain(args: argparse.Namespace) -> Path:
    model, meta = load_checkpoint(args.checkpoint)
    dmeta = DomainMeta("msp", 0.5, 0.004, 0.004, 500, 10, {}, args.command_line, args.seed, {})
    path = save_domain_score(DomainScore(model, MaxSoftmax(), 0.5, "msp"), args.checkpoint, dmeta)
    test = {"fpr_in_domain": 0.003, "auroc": {"fashionmnist test": 0.9}, "detection": {}, "false_flags": {}}
    record = {"victim_sha256": meta.sha256, "evaluation": {"methods": {"msp": test}}}
    Path(args.out).write_text(json.dumps(record))
    return path


def _misinfo(args: argparse.Namespace) -> Path:
    _, victim = load_checkpoint(args.checkpoint)
    shipped = read_meta(SHIPPED_DIR / "lenet-mnist-misinfo.json")
    shipped.extra["victim_sha256"] = victim.sha256
    shipped.mean, shipped.std = victim.mean, victim.std  # as the real step: the victim's normalisation
    torch.manual_seed(args.seed)
    return save_checkpoint(build_model(shipped), shipped, misinformation_path(args.checkpoint))


def _edm(args: argparse.Namespace) -> Path:
    members, meta = load_ensemble("lenet-mnist")
    return save_ensemble(members, meta, args.checkpoint)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A copy of lenet-mnist's weights and metadata, without its stored sensitivity or any companion."""
    shutil.copy(SHIPPED_DIR / "lenet-mnist.safetensors", tmp_path / "lenet-mnist.safetensors")
    meta = read_meta(SHIPPED_DIR / "lenet-mnist.json")
    meta.extra.pop("sensitivity")
    (tmp_path / "victim.json").write_text(json.dumps(asdict(meta)))
    return tmp_path / "victim.json"


def prepare(victim: Path, *extra: str) -> dict:
    argv = ["prepare", "--checkpoint", str(victim), "--data-root", str(victim.parent), "--ood-dataset", "fashionmnist"]
    assert main([*argv, "--edm", "--quiet", *extra]) == 0
    return json.loads((victim.parent / "victim.prepare" / "report.json").read_text())


def test_the_steps_run_in_order_and_a_second_run_keeps_them(victim: Path, calls: list[str]) -> None:
    first = prepare(victim, "--serve-steps", "30")
    assert calls == ORDER
    assert [s["status"] for s in first["steps"]] == ["made"] * 5
    warm = first["steps"][1]
    assert warm["command"].startswith("deepdefense warmstart --checkpoint") and "--serve-steps 30" in warm["command"]
    assert json.loads(warm_start_paths(victim)[0].read_text())["serve_steps"] == 30  # the flag reached the step
    second = prepare(victim)
    assert calls == ORDER  # nothing made again
    assert [s["status"] for s in second["steps"]] == ["kept"] * 5
    assert second["steps"][4]["figures"] == first["steps"][4]["figures"]  # a kept step reports what it measured


def test_without_edm_the_baseline_is_not_made(victim: Path, calls: list[str]) -> None:
    argv = ["prepare", "--checkpoint", str(victim), "--data-root", str(victim.parent), "--ood-dataset", "mnist"]
    assert main([*argv, "--quiet"]) == 0
    assert calls == ORDER[:4]


def test_a_changed_victim_makes_every_step_again(victim: Path, calls: list[str]) -> None:
    prepare(victim)
    model, meta = load_checkpoint(victim)
    with torch.no_grad():
        model.net.classifier.fc2.bias.add_(0.01)  # retrained: other weights, same metadata (sensitivity included)
    save_checkpoint(model, meta, victim)
    report = prepare(victim)
    assert calls == ORDER + ORDER
    reasons = {s["step"]: s["why"] for s in report["steps"]}
    assert reasons["sensitivity"] == "computed for other weights"
    assert "learnt for victim weights" in reasons["warmstart"] and "refusing" in reasons["edm"]


def test_redo_makes_the_step_and_what_depends_on_it(victim: Path, calls: list[str]) -> None:
    prepare(victim)
    prepare(victim, "--redo", "sensitivity")
    assert calls[5:] == ["sensitivity", "warmstart"]  # domain, misinfo and edm do not read the sensitivity
    prepare(victim, "--redo", "domain")
    assert calls[7:] == ["domain"]


def test_a_tampered_artifact_is_made_again_with_its_dependants(victim: Path, calls: list[str]) -> None:
    prepare(victim)
    warm = warm_start_paths(victim)[0].with_suffix(".safetensors")
    warm.write_bytes(warm.read_bytes()[:-1] + b"\0")
    report = prepare(victim)
    assert calls[5:] == ["warmstart"]
    assert "sha256" in report["steps"][1]["why"]


def test_the_report_says_whether_the_gate_is_on_and_meets_the_targets(victim: Path, calls: list[str]) -> None:
    report = prepare(victim)
    gate = report["gate"]
    assert gate["server_turns_it_on"] and gate["why_not"] is None
    values = {c["what"].split(":")[0]: (c["value"], c["at_most"], c["passed"]) for c in gate["checks"]}
    assert values["share of unseen in-domain test images the domain score flags"] == (0.003, 0.005, True)
    agreement = values["misinformation model's top-1 agreement with the victim on the test split (%)"]
    assert agreement == (0.02, 10.0, True)  # the shipped misinformation model's measured figure, chance 100/10
    assert gate["targets_met"]
    markdown = (victim.parent / "victim.prepare" / "report.md").read_text()
    assert "turns it on (`--gate auto`)" in markdown and "| misinfo | made (" in markdown
    record = victim.parent / "victim.prepare" / "domain.json"
    flagging = json.loads(record.read_text())
    flagging["evaluation"]["methods"]["msp"]["fpr_in_domain"] = 0.012  # a score that flags 1.2% of honest images
    record.write_text(json.dumps(flagging))
    gate = prepare(victim)["gate"]
    assert gate["server_turns_it_on"] and not gate["targets_met"]
    assert [c["passed"] for c in gate["checks"]] == [False, True]
    assert "| 0.012 | 0.005 | **no** |" in (victim.parent / "victim.prepare" / "report.md").read_text()


def test_without_the_misinformation_model_the_gate_cannot_be_on(victim: Path, calls: list[str]) -> None:
    steps = {s["step"]: s["figures"] for s in prepare(victim)["steps"]}
    for suffix in (".json", ".safetensors"):
        misinformation_path(victim).with_suffix(suffix).unlink()
    gate = gate_verdict(victim, steps, victim.parent, 0.005)
    assert not gate["server_turns_it_on"] and not gate["targets_met"]
    assert "no domain score or no misinformation model" in gate["why_not"]


def test_the_shipped_companions_are_kept_as_they_are(tmp_path: Path, calls: list[str]) -> None:
    """lenet-mnist with everything it ships (its sensitivity stored before it recorded its weights, a warm start
    from before serve_steps was recorded): nothing is made, and the report reads what each artifact says."""
    for path in SHIPPED_DIR.glob("lenet-mnist*"):
        shutil.copy(path, tmp_path / path.name)
    argv = ["prepare", "--checkpoint", str(tmp_path / "lenet-mnist.json"), "--data-root", str(tmp_path)]
    assert main([*argv, "--edm", "--ood-dataset", "fashionmnist", "--quiet"]) == 0
    assert calls == []
    report = json.loads((tmp_path / "lenet-mnist.prepare" / "report.json").read_text())
    figures = {s["step"]: s["figures"] for s in report["steps"]}
    assert figures["warmstart"]["serve_steps"] == 10
    assert figures["edm"]["served_accuracy"] == 98.63 and figures["misinfo"]["misinfo_top1_accuracy"] == 0.02
    assert report["gate"]["server_turns_it_on"]


def test_a_model_from_elsewhere_is_converted_once_and_again_when_its_description_changes(
    tmp_path: Path, calls: list[str], data_root: Path
) -> None:
    shutil.copy(SHIPPED_DIR / "lenet-mnist.safetensors", tmp_path / "weights.safetensors")
    description = {
        "arch": "lenet", "weights": "weights.safetensors", "dataset": "mnist", "input_shape": [1, 28, 28],
        "value_range": [0, 1], "normalisation": {"mean": [0.1307], "std": [0.3081]},
        "classes": [str(d) for d in range(10)],
    }  # fmt: skip
    (tmp_path / "model.json").write_text(json.dumps(description))
    argv = ["prepare", "--from", str(tmp_path / "model.json"), "--checkpoint", str(tmp_path / "mine")]
    argv += ["--data-root", str(data_root), "--ood-dataset", "fashionmnist", "--quiet"]
    assert main(argv) == 0
    assert calls == ORDER[:4]
    report = json.loads((tmp_path / "mine.prepare" / "report.json").read_text())
    assert report["victim"]["converted_in_this_run"] and report["victim"]["test_accuracy"] == 99.51
    assert main(argv) == 0
    assert calls == ORDER[:4]  # converted and prepared: all kept
    description["normalisation"] = {"mean": [0.5], "std": [0.5]}  # the same weights, read otherwise
    (tmp_path / "model.json").write_text(json.dumps(description))
    assert main(argv) == 0
    assert calls == ORDER[:4] * 2
    report = json.loads((tmp_path / "mine.prepare" / "report.json").read_text())
    why = {s["step"]: s["why"] for s in report["steps"]}
    assert why["domain"] == "made from import, made in this run"  # its weights' sha256 alone would have kept it
    assert why["misinfo"] == "misinformation model mine-misinfo does not share mine's classes and input"
    assert read_meta(tmp_path / "mine.json").mean == [0.5]
