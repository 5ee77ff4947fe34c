"""The gate-aware thief and the detectors that measure what he can tell (issue 28): the twin attacker's
filter, the adaptive collection's twins, and the detectors
themselves on answers whose difference is known."""

from __future__ import annotations

import torch

from deepdefense.clients.adaptive import believed_honest, collect_adaptive, twin_of, with_twins
from deepdefense.clients.attack_losses import MOVED, kept_answers
from deepdefense.clients.oracle import OracleReply
from deepdefense.clients.transfer import TransferSet, TransferStore
from deepdefense.measure.detectors import Paired, detect, map_reading
from deepdefense.models.lenet import LeNet

SHAPE = (1, 28, 28)


def test_twins_move_one_pixel_by_one_step_and_interleave() -> None:
    x = torch.rand((5, *SHAPE), generator=torch.Generator().manual_seed(0))
    t = twin_of(x)
    diff = (t - x).abs()
    assert torch.allclose(diff.flatten(1).amax(1), torch.full((5,), 1 / 255)) and (diff > 0).sum() == 5
    both = with_twins(x)
    # exact: interleaving copies the images
    assert torch.equal(both[0::2], x) and torch.equal(both[1::2], t)


def test_the_twin_attacker_keeps_what_moved_and_never_a_twin() -> None:
    p = torch.softmax(torch.randn(8, 10, generator=torch.Generator().manual_seed(0)), -1)
    p[1], p[3] = p[0], p[2] + torch.tensor([MOVED / 2] + [-MOVED / 18] * 9)  # pair 0 stood still, pair 1 barely
    mask = kept_answers("twin", p)
    assert mask.tolist() == [False, False, False, False, True, False, True, False]
    data = TransferSet(torch.zeros(8, *SHAPE), p.argmax(1), p, None, torch.zeros(8, dtype=torch.long))
    assert len(believed_honest(data)) == 2


def _paired(n: int, moves: float, seed: int) -> Paired:
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(3 * torch.randn(n, 10, generator=g), -1)
    m = torch.rand(n, 28, 28, generator=g)
    jitter = lambda t: t + moves * torch.rand(t.shape, generator=g)
    return Paired(p, m, jitter(p), jitter(m))


def test_the_detectors_tell_answers_that_stand_still_and_not_answers_alike() -> None:
    honest = _paired(400, moves=0.05, seed=0)
    assert detect(honest, _paired(400, moves=0.0, seed=1), seed=0)["twin_probabilities"] > 0.95, "a tell missed"
    alike = detect(honest, _paired(400, moves=0.05, seed=2), seed=0)
    assert all(0.35 < v < 0.65 for v in alike.values()), f"answers of one kind told apart: {alike}"


def test_the_answer_shape_detector_sees_saturated_answers() -> None:
    """Fixed, saturated answers (one-hot probabilities, the first gate's) against confident honest ones: an
    unregularised fit of features that separate almost perfectly diverges (weights of 1e26) and scores chance
    on the held-out half; the detector must not call that indistinguishable."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(10 * torch.randn(400, 10, generator=g), -1)
    m = torch.rand(400, 28, 28, generator=g)
    one_hot = torch.nn.functional.one_hot(p.argmax(1), 10).float()
    assert detect(Paired(p, m, p, m), Paired(one_hot, m, one_hot, m), seed=0)["answer_shape"] > 0.7


def test_map_reading_reads_a_class_the_maps_carry_and_not_one_they_do_not() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (400,), generator=g)
    p = torch.nn.functional.one_hot(labels, 10).float() * 0.9 + 0.01
    maps = 0.1 * torch.rand(400, 28, 28, generator=g)
    maps[torch.arange(400), 0, labels] = 1.0  # the class is written into the map's first row
    own = Paired(p, maps, p, maps)
    foreign = Paired(p, 0.1 * torch.rand(400, 28, 28, generator=g), p, maps)
    read = map_reading(own, foreign, seed=0)
    assert read["own_heldout"] > 0.9 and read["foreign"] < 0.3, read


class _HalfHonestOracle:
    """Answers that move with a twin for images whose mean is below ½ (honest-like), and stand still otherwise."""

    def query(self, x: torch.Tensor, *, explain: bool = True) -> OracleReply:
        fixed = torch.softmax(torch.arange(10.0), 0).expand(len(x), 10)
        shift = torch.zeros(len(x), 10)
        shift[:, 9] = 10 * x.flatten(1)[:, 406]  # the twin's pixel (14, 14) moves the top class's logit
        moving = torch.softmax(torch.arange(10.0) + shift, 1)
        p = torch.where((x.flatten(1).mean(1) < 0.5)[:, None], moving, fixed)
        return OracleReply(p.argmax(1), p, torch.zeros(len(x), 28, 28) if explain else None)


def test_the_adaptive_thief_grows_only_from_answers_that_moved(tmp_path) -> None:
    dark = torch.rand((4, *SHAPE), generator=torch.Generator().manual_seed(0)) * 0.4
    bright = 0.6 + torch.rand((4, *SHAPE), generator=torch.Generator().manual_seed(1)) * 0.4
    store = TransferStore(tmp_path / "store", {"test": "adaptive"})
    grown_from: list[int] = []

    def train(data: TransferSet) -> torch.nn.Module:
        grown_from.append(len(data))
        return LeNet()

    sent = collect_adaptive(
        _HalfHonestOracle(),
        store,
        torch.cat([dark, bright]),
        budget=32,
        rounds=2,
        step=0.1,
        train=train,
        progress=False,
    )
    data = store.load()
    # exact: the store keeps the twin's bytes, made by the same function
    assert sent == len(data) == 16 + 8 and torch.equal(data.images[1], twin_of(dark[:1])[0]), "8 + twins, 4 + twins"
    assert grown_from == [4], "round 1 grew from the 4 answers that moved, not the 4 that stood still"


def test_a_monitored_oracle_answers_as_the_server_with_keys(tmp_path) -> None:
    """``deepdefense eval --monitored``: the arm's queries are one key's; a key that asks everything twice is
    escalated by the monitor's screening, and from then on every answer is the misinformation path's."""
    from deepdefense.defense import NoDefense
    from deepdefense.defense.gate import MISINFORM, MisinformationGate
    from deepdefense.defense.interpreters import create_interpreter
    from deepdefense.measure.local_oracle import MonitoredOracle
    from deepdefense.server.monitor import ExtractionMonitor, MonitorPolicy

    torch.manual_seed(0)
    victim, wrong = LeNet().eval().requires_grad_(False), LeNet().eval().requires_grad_(False)
    inner = NoDefense(victim, create_interpreter("gradcam", victim, SHAPE))
    never = lambda x: torch.zeros(len(x), dtype=torch.bool)  # the domain score flags nothing
    gate = MisinformationGate(inner, never, wrong)
    policy = MonitorPolicy(window=10, min_queries=5)
    monitor = ExtractionMonitor(tmp_path / "state.sqlite", policy)
    oracle = MonitoredOracle(gate, None, monitor, "a77ac4e40000")  # type: ignore[arg-type]
    x = torch.rand((8, *SHAPE), generator=torch.Generator().manual_seed(1))
    first = oracle.query(x[:4])
    torch.testing.assert_close(first.probabilities, torch.stack([a.probabilities for a in inner.answer(x[:4])]))
    oracle.query(with_twins(x[4:]))  # 4 twins in 8: near-duplicates above 20% of the window
    assert monitor.escalated("a77ac4e40000")
    after = oracle.query(x[:4])
    everything = torch.full((4,), MISINFORM, dtype=torch.int8)
    torch.testing.assert_close(
        after.probabilities, torch.stack([a.probabilities for a in gate.answer(x[:4], override=everything)])
    )
    assert after.labels.tolist() == wrong(x[:4]).argmax(1).tolist()
    monitor.close()
