"""A model trained outside this project, made an ordinary checkpoint of it (``models/checkpoint.py``).

What comes in: the weights of a registered architecture (``models/registry.py``) — a state dict saved with
``torch.save`` or as safetensors, or a TorchScript module of that architecture — and a small description of
its input, JSON or TOML (``docs/own-model.md``)::

    arch = "lenet"                       # registered architecture whose state dict the weights are
    weights = "my-lenet.pt"              # relative to the description
    format = "state_dict"                # or "torchscript" (default: state_dict)
    dataset = "mnist"                    # a data set of models/data.py: prepare fits on its training split
    input_shape = [1, 28, 28]            # C, H, W: the data set's images
    value_range = [0.0, 1.0]             # what the model was trained to read for black .. white
    classes = ["0", "1", ...]            # names in label order, as many as the data set's labels
    [normalisation]                      # what its training applied after the value range, per channel
    mean = [0.1307]
    std = [0.3081]
    [card]                               # optional: fields of models.data.DatasetLook for the model card
    subject = "one handwritten digit"

What goes out: ``<out>.safetensors`` + ``<out>.json`` like a checkpoint of ``deepdefense train``, whose model reads
values in [0, 1] (the server's) and applies the normalisation itself: the value range is folded into it,
mean' = (mean − lo) / (hi − lo), std' = std / (hi − lo). Its test accuracy is measured on the data set's test
split; ``extra["imported"]`` records the description and the sha256 of both files, so that a changed file is
converted again (``deepdefense prepare --from``).
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from .artifacts import sha256_file
from .checkpoint import CheckpointMeta, read_meta, save_checkpoint
from .data import get_spec, load_split, look_of
from .normalized import Normalized
from .registry import create_model, list_models
from .train import evaluate

FORMATS = ("state_dict", "torchscript")
#: What a TorchScript module's logits may differ from the registered architecture's with the same weights.
TORCHSCRIPT_TOLERANCE = 1e-4


class DescriptionError(ValueError):
    """A description or weights file that cannot become a checkpoint: the message names the file and what is wrong."""


@dataclass(frozen=True)
class Description:
    """A model's description, checked field by field (:func:`read_description`)."""

    path: Path
    arch: str
    weights: Path
    format: str
    dataset: str
    input_shape: tuple[int, int, int]
    value_range: tuple[float, float]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    card: dict[str, Any]
    seed: int | None
    source: str

    def folded(self) -> tuple[list[float], list[float]]:
        """The normalisation for inputs in [0, 1]: the value range folded into mean and std."""
        lo, hi = self.value_range
        return [(m - lo) / (hi - lo) for m in self.mean], [s / (hi - lo) for s in self.std]


REQUIRED = ("arch", "weights", "dataset", "input_shape", "value_range", "normalisation", "classes")
OPTIONAL = ("format", "card", "seed", "source")


def read_description(path: str | os.PathLike[str]) -> Description:
    """Parse and check a description (``.json`` or ``.toml``); :class:`DescriptionError` says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DescriptionError(f"model description {path} not found")
    try:
        raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DescriptionError(
            f"{path.name}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {err}"
        ) from None
    if not isinstance(raw, dict):
        raise DescriptionError(f"{path.name}: expected a table of fields, got {type(raw).__name__}")

    def fail(message: str) -> DescriptionError:
        return DescriptionError(f"{path.name}: {message}")

    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise fail(f"missing field(s) {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise fail(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(REQUIRED + OPTIONAL)})")
    if raw["arch"] not in list_models():
        raise fail(f"arch {raw['arch']!r} is not a registered architecture ({', '.join(list_models())})")
    fmt = raw.get("format", "state_dict")
    if fmt not in FORMATS:
        raise fail(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    try:
        spec = get_spec(str(raw["dataset"]))
    except KeyError as err:
        raise fail(str(err)) from None
    shape = _numbers(raw["input_shape"], int, "input_shape", fail)
    if len(shape) != 3 or min(shape) < 1:
        raise fail(f"input_shape must be [channels, height, width], got {raw['input_shape']}")
    if tuple(shape) != spec.input_shape:
        raise fail(
            f"input_shape {list(shape)} is not the shape of {spec.name}'s images {list(spec.input_shape)} "
            "(prepare fits and measures on them)"
        )
    value_range = _numbers(raw["value_range"], float, "value_range", fail)
    if len(value_range) != 2 or not value_range[0] < value_range[1]:
        raise fail(f"value_range must be [lo, hi] with lo < hi, got {raw['value_range']}")
    norm = raw["normalisation"]
    if not isinstance(norm, dict) or set(norm) != {"mean", "std"}:
        raise fail("normalisation must hold exactly mean and std (per channel; mean [0] and std [1] for none)")
    mean = _numbers(norm["mean"], float, "normalisation.mean", fail)
    std = _numbers(norm["std"], float, "normalisation.std", fail)
    if len(mean) != shape[0] or len(std) != shape[0]:
        raise fail(f"normalisation needs one mean and one std per channel ({shape[0]}), got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise fail(f"normalisation.std must be positive, got {std}")
    classes = raw["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
        raise fail("classes must be a list of non-empty names, in label order")
    if spec.classes is not None and len(classes) != len(spec.classes):
        raise fail(f"classes has {len(classes)} names, {spec.name} has {len(spec.classes)} labels")
    card = raw.get("card", {})
    if not isinstance(card, dict):
        raise fail("card must be a table of model card fields")
    try:
        look_of(spec.name, card)
    except (TypeError, ValueError) as err:
        raise fail(f"card: {err}") from None
    seed = raw.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise fail(f"seed must be an integer, got {seed!r}")
    return Description(
        path=path,
        arch=raw["arch"],
        weights=path.parent / str(raw["weights"]),
        format=fmt,
        dataset=spec.name,
        input_shape=(shape[0], shape[1], shape[2]),
        value_range=(value_range[0], value_range[1]),
        mean=tuple(mean),
        std=tuple(std),
        classes=tuple(classes),
        card=card,
        seed=seed,
        source=str(raw.get("source", "")),
    )


def _numbers(value: Any, kind: type, name: str, fail: Any) -> list[Any]:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise fail(f"{name} must be a list of numbers, got {value!r}")
    if kind is int and not all(float(v).is_integer() for v in value):
        raise fail(f"{name} must be whole numbers, got {value!r}")
    return [kind(v) for v in value]


def load_network(desc: Description) -> nn.Module:
    """The registered architecture (with one output per class) holding the description's weights, in eval mode;
    refuses weights that do not fit it (missing, unexpected or differently shaped tensors), an input it cannot take,
    and a TorchScript module that computes something else than the architecture with its weights."""
    if not desc.weights.is_file():
        raise DescriptionError(f"{desc.path.name}: weights file {desc.weights} not found")
    net = create_model(desc.arch, num_classes=len(desc.classes), in_channels=desc.input_shape[0])
    scripted = None
    if desc.format == "torchscript":
        try:
            scripted = torch.jit.load(str(desc.weights), map_location="cpu").eval()
        except RuntimeError as err:
            raise DescriptionError(f"{desc.weights.name} is not a TorchScript module: {_first(err)}") from None
        state = dict(scripted.state_dict())
    else:
        state = _state_dict(desc.weights)
    _check_fit(desc, net, state)
    net.load_state_dict(state, strict=True)
    net.eval()
    x = torch.rand((4, *desc.input_shape), generator=torch.Generator().manual_seed(0))
    lo, hi = desc.value_range
    model_input = (lo + x * (hi - lo) - torch.tensor(desc.mean).view(1, -1, 1, 1)) / torch.tensor(desc.std).view(
        1, -1, 1, 1
    )
    with torch.no_grad():
        try:
            logits = net(model_input)
        except RuntimeError as err:
            raise DescriptionError(
                f"{desc.path.name}: architecture {desc.arch!r} does not take input_shape {list(desc.input_shape)} "
                f"({_first(err)})"
            ) from None
        if scripted is not None:
            gap = float((scripted(model_input) - logits).abs().max())
            scale = max(float(logits.abs().max()), 1.0)
            if gap > TORCHSCRIPT_TOLERANCE * scale:
                raise DescriptionError(
                    f"{desc.weights.name}: the TorchScript module's logits differ from architecture {desc.arch!r} "
                    f"with its weights by up to {gap:.3g}: it computes something else (export the plain network, "
                    "and describe its input's normalisation in the description)"
                )
    return net


def _state_dict(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError) as err:
        if "TorchScript" in str(err):
            raise DescriptionError(f'{path.name} is a TorchScript module: give format = "torchscript"') from None
        raise DescriptionError(
            f"{path.name}: not a state dict readable by torch.load or safetensors ({_first(err)})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise DescriptionError(f"{path.name}: holds {keys}, not a state dict of tensors (save model.state_dict())")
    return state


def _check_fit(desc: Description, net: nn.Module, state: dict[str, Tensor]) -> None:
    expected = net.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected)}")
    for k, v in expected.items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            problems.append(f"{k} is {tuple(state[k].shape)} in the file, {tuple(v.shape)} in {desc.arch!r}")
    if problems:
        raise DescriptionError(
            f"{desc.weights.name}: the weights do not fit architecture {desc.arch!r} with {len(desc.classes)} classes "
            f"and {desc.input_shape[0]} input channel(s): " + "; ".join(problems)
        )


def _first(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def imported_record(desc: Description) -> dict[str, Any]:
    """What a converted checkpoint records about where it comes from (compared by :func:`is_current`)."""
    return {
        "description": desc.path.name,
        "description_sha256": sha256_file(desc.path),
        "weights_file": desc.weights.name,
        "weights_sha256": sha256_file(desc.weights),
        "format": desc.format,
        "value_range": list(desc.value_range),
        "normalisation": {"mean": list(desc.mean), "std": list(desc.std)},
    }


def is_current(meta_path: Path, desc: Description) -> bool:
    """Whether ``meta_path`` is the checkpoint converted from exactly these description and weights files.
    Refuses (:class:`DescriptionError`) to stand in for a checkpoint that was not converted from a description."""
    if not meta_path.is_file():
        return False
    recorded = read_meta(meta_path).extra.get("imported")
    if recorded is None:
        raise DescriptionError(
            f"{meta_path} is a checkpoint not converted from a description; refusing to overwrite it "
            "(give --checkpoint a new path)"
        )
    current = imported_record(desc)
    return all(recorded.get(k) == current[k] for k in ("description_sha256", "weights_sha256"))


def import_model(
    desc: Description, out: str | os.PathLike[str], *, data_root: str | os.PathLike[str] | None, command: str
) -> Path:
    """Write the checkpoint of ``desc``'s model at ``out`` (without suffix), its accuracy measured on the data set's
    test split; returns its metadata path."""
    mean, std = desc.folded()
    model = Normalized(load_network(desc), mean, std).eval()
    accuracy = evaluate(model, load_split(desc.dataset, data_root, "test"), torch.device("cpu"))
    extra: dict[str, Any] = {"imported": imported_record(desc), "torch": torch.__version__}
    if desc.card:
        extra["card"] = desc.card
    meta = CheckpointMeta(
        arch=desc.arch,
        dataset=desc.dataset,
        classes=list(desc.classes),
        input_shape=list(desc.input_shape),
        mean=mean,
        std=std,
        test_accuracy=round(accuracy, 2),
        seed=-1 if desc.seed is None else desc.seed,
        command=desc.source or f"trained outside this project; converted by {command}",
        extra=extra,
    )
    return save_checkpoint(model, meta, out)
