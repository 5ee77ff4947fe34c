"""Watermarked answers (server/watermark.py) and ``deepdefense ownership verify``: the keyed selection (per key,
the fraction, near-duplicates), the answer (the watermark label, the honest sorted probabilities, the map of
that label), the records across a restart (SQLite) and across two apps on one real Redis, the verdict for a
copy and for an independent model (the count and the exact rank test), and the watermark's secret kept out of
logs and outputs."""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from support.redis_server import RedisServer, pin_redis_secrets
from support.servers import bearer, key_id_of, serving
from support.settings import make_settings, pin_monitor_secret, pin_secrets

from deepdefense.cli import main
from deepdefense.defense import NoDefense
from deepdefense.measure.launcher import in_thread
from deepdefense.models.checkpoint import load_checkpoint
from deepdefense.models.data import load_split
from deepdefense.server.app import create_app
from deepdefense.server.keystore import WATERMARK, server_secret
from deepdefense.server.watermark import (
    Record,
    SqliteWatermarkStore,
    Watermark,
    ownership_test,
    uniform_sum_cdf,
    watermark_ranks,
)

pytestmark = pytest.mark.usefixtures("no_server_env")

ALICE, BOB = "alice-key-0001-watermark", "bob-key-0002-watermark"
SECRET = b"the watermark secret of the tests"
A, B = "a1a1a1a1a1a1", "b2b2b2b2b2b2"


@pytest.fixture(scope="module")
def digits(data_root: Path) -> torch.Tensor:
    return load_split("mnist", str(data_root), "test").tensors[0][:2000]


def _twins(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Each image with one pixel (a random one) set to white: a twin a thief compares answers with."""
    flat = x.clone().reshape(len(x), -1)
    where = torch.randint(0, flat.shape[1], (len(x),), generator=torch.Generator().manual_seed(seed))
    flat[torch.arange(len(x)), where] = 1.0
    return flat.reshape(x.shape)


def test_the_selection_is_keyed_honours_the_fraction_and_follows_near_duplicates(
    tmp_path: Path, digits: torch.Tensor
) -> None:
    labels = [3] * len(digits)
    first = Watermark(tmp_path / "a.sqlite", SECRET, 10, fraction=0.05).marks(A, digits, labels)
    marks = first.marks
    again = Watermark(tmp_path / "b.sqlite", SECRET, 10, fraction=0.05).marks(A, digits, labels).marks
    assert again == marks, "the same key's queries were decided differently by another server with the secret"
    other = Watermark(tmp_path / "c.sqlite", SECRET, 10, fraction=0.05).marks(B, digits, labels).marks
    chosen = {i for i, m in enumerate(marks) if m is not None}
    assert chosen != {i for i, m in enumerate(other) if m is not None}, "two keys share one selection"
    # the fraction: 2,000 draws at 5% give 100 ± 10; 4 standard deviations either way
    assert 60 <= len(chosen) <= 140, f"{len(chosen)} of 2000 watermarked at a fraction of 5%"
    assert all(m != 3 and 0 <= m < 10 for m in marks if m is not None), "a watermark carries the answer's own label"
    assert len({m for m in marks if m is not None}) == 9, "the watermark classes are not spread over the others"
    # near-duplicates of watermarked queries get their watermark, in a later request and in the same one
    watermark = Watermark(tmp_path / "a.sqlite", SECRET, 10, fraction=0.05)
    answers = [NoDefenseAnswer(3)] * len(digits)
    watermark.record(A, digits, answers, first)  # type: ignore[arg-type]
    assert len(watermark.records(A)) == sum(first.fresh) >= len(chosen) - 5, (
        "some digits share a coarse cell: kept once"
    )
    twins = watermark.marks(A, _twins(digits, 1), labels)
    assert not any(twins.fresh[i] for i in chosen), "a near-duplicate of a kept query would be kept again"
    honest = [i for i in range(len(digits)) if i not in chosen]
    assert sum(twins.fresh[i] for i in honest) <= 0.05 * len(honest), "honest queries' twins decided afresh"
    twins = twins.marks
    assert [twins[i] for i in sorted(chosen)] == [marks[i] for i in sorted(chosen)], "a twin lost its watermark"
    rows = sorted(chosen)[:20]
    both = torch.cat([digits[rows], _twins(digits[rows], 2)])
    fresh = Watermark(tmp_path / "d.sqlite", SECRET, 10, fraction=0.05).marks(A, both, [3] * len(both))
    assert fresh.marks[20:] == fresh.marks[:20] == [marks[i] for i in rows], "a twin in the same request lost its mark"
    assert fresh.fresh == [True] * 20 + [False] * 20


def test_an_escalated_key_is_watermarked_at_the_larger_fraction_the_same_queries_first(
    tmp_path: Path, digits: torch.Tensor
) -> None:
    labels = [3] * len(digits)
    watermark = Watermark(tmp_path / "a.sqlite", SECRET, 10, fraction=0.02, escalated_fraction=0.2)
    watched = {i for i, m in enumerate(watermark.marks(A, digits, labels).marks) if m is not None}
    escalated = watermark.marks(A, digits, labels, escalated=True).marks
    chosen = {i for i, m in enumerate(escalated) if m is not None}
    # 2,000 draws: 40 ± 6 at 2%, 400 ± 18 at 20%; 4 standard deviations either way
    assert 15 <= len(watched) <= 65 and 320 <= len(chosen) <= 480, (len(watched), len(chosen))
    assert watched <= chosen, "a query watermarked before the escalation was answered as it is after it"
    with pytest.raises(ValueError, match="escalated_fraction"):
        Watermark(tmp_path / "b.sqlite", SECRET, 10, fraction=0.05, escalated_fraction=0.02)
    assert Watermark(tmp_path / "c.sqlite", SECRET, 10, fraction=0.05).escalated_fraction == 0.05


def test_the_server_watermarks_an_escalated_keys_answers_at_the_escalated_fraction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits: torch.Tensor
) -> None:
    """Alice is escalated by noise (the domain flags); then she and Bob send 64 digits each (other digits: Bob
    sending hers would be tainted by them): hers are kept as watermarked at 50%, his at 1%."""
    monkeypatch.setenv("DD_API_KEYS", f"{ALICE},{BOB}")
    options = {"gate": "misinform", "monitor": "on", "monitor_window": 10, "monitor_min_queries": 5}
    settings = make_settings(
        tmp_path, watermark="on", watermark_fraction=0.01, watermark_escalated_fraction=0.5, **options
    )
    pin_secrets(settings)
    pin_monitor_secret(settings.budget_db)  # no chance near-duplicate of Alice's queries among Bob's taints him
    noise = torch.rand((10, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    x = digits[:64]
    with serving(app := create_app(settings)) as client:
        _predict(client, ALICE, noise)
        assert app.state.runtime.monitor.escalated(key_id_of(app, ALICE))
        before = len(app.state.runtime.watermark.records(key_id_of(app, ALICE)))
        for a, b in zip(x.split(16), digits[64:128].split(16), strict=True):
            _predict(client, ALICE, a)
            _predict(client, BOB, b)
        assert not app.state.runtime.monitor.escalated(key_id_of(app, BOB))
        alice = len(app.state.runtime.watermark.records(key_id_of(app, ALICE))) - before
        bob = len(app.state.runtime.watermark.records(key_id_of(app, BOB)))
    # 64 digits: 32 ± 4 at 50%, 0.6 ± 0.8 at 1% (the pinned secrets fix the draw: 4 standard deviations apart)
    assert alice >= 16 and bob <= 4, (alice, bob)


class NoDefenseAnswer:
    """The one field of an answer that :meth:`Watermark.record` reads."""

    def __init__(self, label: int) -> None:
        self.label = label


def test_a_watermarked_answer_carries_its_class_with_the_honest_shape(
    tmp_path: Path, defense: NoDefense, digits: torch.Tensor
) -> None:
    x = digits[:64]
    honest = [replace(a, misinformed=i % 2 == 0) for i, a in enumerate(defense.answer(x))]  # either path of a gate
    watermark = Watermark(tmp_path / "w.sqlite", SECRET, 10, fraction=0.2)
    sent = watermark.apply(A, x, honest)
    marks = {r.mark: r for r in watermark.records(A)}
    assert 5 <= len(watermark.records(A)) <= 25, "a fifth of 64 queries, give or take"
    for i, (h, a) in enumerate(zip(honest, sent, strict=True)):
        if a is h:
            continue
        assert a.label != h.label and int(a.probabilities.argmax()) == a.label, "the label is not the watermark class"
        # exact: relabelling swaps two entries, a permutation of the same floats
        assert torch.equal(a.probabilities.sort().values, h.probabilities.sort().values), "the answer's shape changed"
        assert float(a.probabilities[h.label]) == float(h.probabilities[a.label]), "the two classes were not swapped"
        assert a.attribution is h.attribution and a.misinformed == h.misinformed, "more than the label changed"
        # exact: a record keeps the query's float32 bytes
        assert a.label in marks and any(torch.equal(r.query(), x[i]) for r in watermark.records(A)), "not kept"
    assert sum(a is not h for a, h in zip(sent, honest, strict=True)) == len(watermark.records(A))


def _predict(client, key: str, x: torch.Tensor) -> list[int]:
    r = client.post("/predict", json={"instances": [{"pixels": q.tolist()} for q in x]}, headers=bearer(key))
    assert r.status_code == 200, r.text
    return [p["label"] for p in r.json()["predictions"]]


def test_records_survive_a_restart_and_answers_stay_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DD_API_KEYS", f"{ALICE},{BOB}")
    settings = make_settings(tmp_path, watermark="auto", watermark_fraction=0.1)
    pin_secrets(settings)  # which of the 48 queries are marked is then fixed (some are: asserted below)
    victim, _ = load_checkpoint("lenet-mnist")
    x = digits[:48]
    with torch.no_grad():
        truth = victim(x).argmax(1).tolist()
    caplog.set_level(logging.DEBUG)
    with serving(app := create_app(settings)) as client:
        got = [label for b in x.split(16) for label in _predict(client, ALICE, b)]
        alice = key_id_of(app, ALICE)
        records = app.state.runtime.watermark.records(alice)
        changed = [i for i in range(len(x)) if got[i] != truth[i]]
        assert 1 <= len(changed) == len(records), "the answers that differ from the victim's are not the records"
        assert [got[i] for i in changed] == [r.mark for r in records]
        assert [truth[i] for i in changed] == [r.label for r in records]
        # exact: a record keeps the query's float32 bytes
        assert all(torch.equal(r.query(), x[i]) for r, i in zip(records, changed, strict=True)), "a query not kept"
        bob = _predict(client, BOB, x[:16])
    with serving(app := create_app(settings)) as client:  # a restart on the same database
        assert len(app.state.runtime.watermark.records(alice)) == len(records), "the records did not survive"
        assert [label for b in x.split(16) for label in _predict(client, ALICE, b)] == got, "answers changed"
        assert _predict(client, BOB, x[:16]) == bob
    secret = server_secret(WATERMARK, None, settings.budget_db)
    assert secret.hex() not in caplog.text and repr(secret) not in caplog.text, "the watermark's secret was logged"


def test_two_apps_on_one_redis_share_the_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits: torch.Tensor, redis_server: RedisServer
) -> None:
    monkeypatch.setenv("DD_API_KEYS", ALICE)
    settings = make_settings(tmp_path, watermark="on", watermark_fraction=0.1, state=redis_server.url)
    pin_redis_secrets(redis_server)  # at random, no query of 32 is marked once in 30 (0.9 ** 32)
    x = digits[:32]
    with serving(first := create_app(settings)) as one, serving(second := create_app(settings)) as two:
        got = [label for b in x.split(16) for label in _predict(one, ALICE, b)]
        alice = key_id_of(first, ALICE)
        assert key_id_of(second, ALICE) == alice
        kept = second.state.runtime.watermark.records(alice)
        # exact: a record keeps the query's float32 bytes as the server decoded them, and float32 values sent as
        # JSON numbers (tolist's shortest repr) decode to the same float32 values
        assert kept and [r.mark for r in kept] == [
            got[i] for i in range(len(x)) if any(torch.equal(r.query(), x[i]) for r in kept)
        ]
        assert [label for b in x.split(16) for label in _predict(two, ALICE, b)] == got, "the replicas disagree"
        assert len(first.state.runtime.watermark.records(alice)) == len(kept), "a repeated query was kept twice"


def test_the_store_keeps_at_most_its_bound_oldest_dropped(tmp_path: Path) -> None:
    store = SqliteWatermarkStore(tmp_path / "s.sqlite", records=3)
    made = [Record(b"\0" * 4, (1,), m, 0, (f"p{m}",), float(m)) for m in range(1, 6)]
    store.add(A, made[:2])
    store.add(A, made[2:])
    assert [r.mark for r in store.records(A)] == [3, 4, 5]
    assert store.marks_of(A, ["p1", "p2", "p4"]) == {"p4": 4}, "a dropped record's fingerprints still mark"
    assert store.records(B) == [] and store.marks_of(B, ["p4"]) == {}


def test_the_ownership_test_accuses_a_copy_and_not_an_independent_model() -> None:
    records = [Record(b"", (0,), (i % 9) + 1, 0, (), 0.0) for i in range(25)]
    victim = torch.full((25, 10), 0.0).index_fill(1, torch.tensor([0]), 1.0)  # sure of the label
    copy = ownership_test(records, [r.mark for r in records[:8]] + [0] * 17, victim, 10)
    assert copy.agreed == 8 and copy.p_value < 1e-6 and copy.verdict == "copied"
    independent = ownership_test(records, [0] * 24 + [records[24].mark], victim, 10)
    assert independent.p_value > 0.01 and independent.verdict == "not shown"
    careless = ownership_test(records, [(r.mark % 9) + 1 for r in records], victim, 10)  # wrong everywhere else
    assert careless.suspect_rate == pytest.approx(25 / (25 * 8)) and careless.p_value > 0.01


def test_the_rank_sum_distribution_is_exact() -> None:
    for n, m in [(1, 9), (2, 3), (3, 4), (4, 2)]:
        for total in range(n * m + 2):
            brute = sum(sum(r) <= total for r in itertools.product(range(1, m + 1), repeat=n)) / m**n
            assert math.isclose(uniform_sum_cdf(total, n, m), brute, rel_tol=1e-9, abs_tol=1e-15), (n, m, total)
    assert math.isclose(uniform_sum_cdf(29, 29, 9), 9.0**-29, rel_tol=1e-9), "every rank first: (1/9)^n"


def _ranked(records: list[Record], rank: int, classes: int = 10) -> torch.Tensor:
    """Probabilities that put each record's label first and its watermark class ``rank``-th among the others."""
    p = torch.zeros(len(records), classes)
    for i, r in enumerate(records):
        others = [c for c in range(classes) if c not in (r.label, r.mark)]
        order = [*others[: rank - 1], r.mark, *others[rank - 1 :]]
        p[i, r.label] = 0.9
        p[i, order] = torch.linspace(0.05, 0.001, classes - 1)
    return p


def test_the_rank_test_proves_a_copy_whose_top_1_stays_honest() -> None:
    records = [Record(b"", (0,), (i % 9) + 1, 0, (), 0.0) for i in range(25)]
    victim = torch.full((25, 10), 0.0).index_fill(1, torch.tensor([0]), 1.0)
    second = _ranked(records, 1)  # the watermark class right under the honest label: never the top-1
    assert watermark_ranks(records, second).tolist() == [1] * 25
    copy = ownership_test(records, [0] * 25, victim, 10, suspect_probabilities=second)
    assert copy.agreed == 0 and copy.count_p_value == 1.0, "the count alone sees nothing"
    assert copy.mean_rank == 1.0 and copy.rank_p_value == pytest.approx(9.0**-25) and copy.verdict == "copied"
    assert copy.p_value == pytest.approx(2 * 9.0**-25), "twice the smaller p-value"
    last = ownership_test(records, [0] * 25, victim, 10, suspect_probabilities=_ranked(records, 9))
    assert last.mean_rank == 9.0 and last.p_value == 1.0 and last.verdict == "not shown"


def test_ties_count_against_the_accusation() -> None:
    """A suspect that answers one-hot probabilities ties every other class at 0: the watermark class is ranked last,
    never first (ties taken the suspect's way would accuse every such model)."""
    records = [Record(b"", (0,), (i % 9) + 1, 0, (), 0.0) for i in range(25)]
    one_hot = torch.zeros(25, 10).index_fill(1, torch.tensor([0]), 1.0)
    assert watermark_ranks(records, one_hot).tolist() == [9] * 25
    assert ownership_test(records, [0] * 25, one_hot, 10, suspect_probabilities=one_hot).verdict == "not shown"
    answers = [r.mark for r in records[:3]] + [0] * 22  # three watermark labels repeated
    labels = ownership_test(records, answers, one_hot, 10)
    hard = torch.nn.functional.one_hot(torch.tensor(answers), 10).float()
    as_probabilities = ownership_test(records, answers, one_hot, 10, suspect_probabilities=hard)
    assert as_probabilities.rank_p_value is None, "one-hot probabilities are labels: their ranks add nothing"
    assert as_probabilities.p_value == labels.p_value == labels.count_p_value, "the count paid for a rank test"


def test_the_rank_test_holds_its_level_for_models_that_never_saw_the_watermark() -> None:
    """Independent suspects (random probabilities, fixed before the watermark classes are drawn uniformly): the
    rank test's p-value falls under 0.05 about 5% of the time, as an exact test's must (seeded)."""
    g = torch.Generator().manual_seed(0)
    small = []
    for _ in range(400):
        labels = torch.randint(0, 10, (20,), generator=g)
        marks = (labels + torch.randint(1, 10, (20,), generator=g)) % 10
        records = [Record(b"", (0,), int(m), int(c), (), 0.0) for m, c in zip(marks, labels, strict=True)]
        p = torch.rand(20, 10, generator=g).softmax(-1)
        small.append(ownership_test(records, p.argmax(1).tolist(), p, 10, suspect_probabilities=p).rank_p_value)
    share = sum(v < 0.05 for v in small) / len(small)
    assert 0.02 <= share <= 0.09, share


def test_verify_proves_a_copy_served_over_http_and_clears_the_victim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits: torch.Tensor, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DD_API_KEYS", ALICE)
    settings = make_settings(tmp_path, watermark="on", watermark_fraction=0.1)
    pin_secrets(settings)  # the records' number and the victim's chance p-value are then fixed, not drawn
    key_file = tmp_path / "alice.key"
    key_file.write_text(ALICE + "\n")
    with serving(app := create_app(settings)) as client:
        for b in digits[:320].split(16):
            _predict(client, ALICE, b)
        alice = key_id_of(app, ALICE)
    monkeypatch.setenv("DD_BUDGET_DB", str(settings.budget_db))
    # a "copy": the watermarked server itself, asked with the key whose watermark it carries
    with in_thread(create_app(settings)) as url:
        args = ["ownership", "verify", "--api-key-file", str(key_file), "--suspect-url", url]
        assert main([*args, "--suspect-key-file", str(key_file)]) == 0
    copied = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert copied["key_id"] == alice and copied["verdict"] == "copied" and copied["p_value"] < 1e-6
    assert copied["agreed"] == copied["queries"] >= 20
    # the victim never saw the watermark: the independent model of this test
    assert main(["ownership", "verify", "--key-id", alice, "--suspect-checkpoint", "lenet-mnist"]) == 0
    out = capsys.readouterr().out
    cleared = json.loads(out.strip().splitlines()[-1])
    assert cleared["verdict"] == "not shown" and cleared["p_value"] > 0.01 and cleared["agreed"] == 0
    secret = server_secret(WATERMARK, None, settings.budget_db)
    assert secret.hex() not in out + json.dumps(copied), "the watermark's secret was printed"
