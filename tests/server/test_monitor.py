"""The per-key extraction monitor (server/monitor.py): the policy alone, its state across a restart,
and served with the shipped domain score: a key that sends noise is escalated, and from then on its
digits too are misinformed (or refused), while another key's digits keep the victim's answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from support.numerics import CHANGED, PATH_ATOL
from support.servers import bearer, error_of, key_id_of, metric_value, serving
from support.settings import make_settings, pin_monitor_secret

from deepdefense.models.checkpoint import load_checkpoint
from deepdefense.models.data import load_split
from deepdefense.server.app import create_app
from deepdefense.server.monitor import ExtractionMonitor, KeyWindow, MonitorPolicy, SqliteMonitorStore

pytestmark = pytest.mark.usefixtures("no_server_env")

ALICE, BOB, OPERATOR = "alice-key-0001-monitor", "bob-key-0002-monitor", "operator-key-03-monitor"
SHAPE = (1, 28, 28)


def test_the_policy_escalates_a_window_of_flags_and_not_honest_traffic() -> None:
    policy = MonitorPolicy(window=100, min_queries=50, threshold=0.5)
    assert policy.queries_until_escalated([True] * 200) == 50, "all flagged: escalated once min_queries are in"
    honest = [i % 100 == 0 for i in range(5000)]  # 1% flagged, more than the score's false-positive rate
    assert policy.queries_until_escalated(honest) is None
    assert policy.queries_until_escalated([i % 5 < 2 for i in range(1000)]) is None, "40% flagged stays below 0.5"
    # a key that behaves for a long while, then extracts: the window forgets the good past
    late = [False] * 1000 + [True] * 100
    assert policy.queries_until_escalated(late) == 1051
    state = policy.observe(KeyWindow(), [True] * 60, now=7.0)
    assert state.escalated and state.escalated_at == 7.0
    assert policy.observe(state, [False] * 500).escalated, "an escalation is kept until an operator clears it"
    with pytest.raises(ValueError):
        MonitorPolicy(window=10, min_queries=20)


def test_a_full_window_of_mostly_unflagged_queries_is_trusted_until_its_flags_say_otherwise() -> None:
    policy = MonitorPolicy(window=100, min_queries=50, threshold=0.25, trust_rate=0.125)
    s = policy.observe(KeyWindow(), [False] * 99)
    assert policy.standing(s) == "watched", "trusted before its window was full"
    s = policy.observe(s, [False])
    assert policy.standing(s) == "trusted"
    s = policy.observe(s, [True] * 12)  # 12 of the last 100 flagged: at most 12.5%
    assert policy.standing(s) == "trusted"
    s = policy.observe(s, [True])  # 13 of 100
    assert policy.standing(s) == "watched", "the flags stopped counting once the key was trusted"
    assert policy.standing(policy.observe(s, [True] * 20)) == "escalated"
    with pytest.raises(ValueError, match="trust_rate"):
        MonitorPolicy(threshold=0.2, trust_rate=0.3)


def test_the_replay_misinforms_flagged_queries_until_the_key_is_trusted_and_all_once_escalated() -> None:
    policy = MonitorPolicy(window=100, min_queries=50, threshold=0.25, trust_rate=0.125)
    honest = [i % 20 == 0 for i in range(400)]  # 5% flagged
    one_by_one = policy.misinformed(honest)
    assert one_by_one[:100] == honest[:100] and not any(one_by_one[100:])
    # sent 16 at a time, the standing is read before each request: trusted from the 8th request (query 112) on
    by_request = policy.misinformed(honest, per_request=16)
    assert by_request[:112] == honest[:112] and not any(by_request[112:])
    thief = [i % 3 == 0 for i in range(400)]  # a third flagged: escalated, then every answer misinformed
    replayed = policy.misinformed(thief)
    first = policy.queries_until_escalated(thief)
    assert first is not None and replayed[:first] == thief[:first] and all(replayed[first:])


def test_the_state_survives_a_restart_and_an_operator_clears_it(tmp_path: Path) -> None:
    db = tmp_path / "budget.sqlite"
    monitor = ExtractionMonitor(db, MonitorPolicy(window=10, min_queries=5, threshold=0.5))
    assert not monitor.observe("a", [True, True, False])
    monitor.observe("b", [False] * 20)
    monitor.close()
    monitor = ExtractionMonitor(db, MonitorPolicy(window=10, min_queries=5, threshold=0.5))
    assert monitor.observe("a", [True, True]), "the three earlier flags were kept: 4 of 5 flagged"
    assert [k["key_id"] for k in monitor.flagged_keys()] == ["a"] and monitor.flagged_keys()[0]["escalated_after"] == 5
    monitor.close()
    monitor = ExtractionMonitor(db, MonitorPolicy(window=10, min_queries=5, threshold=0.5))
    assert monitor.escalated("a") and not monitor.escalated("b") and monitor.count_flagged() == 1
    assert monitor.clear("a") and not monitor.clear("a") and not monitor.clear("b")
    assert not monitor.escalated("a")
    monitor.close()


def test_a_kept_secret_keys_the_fingerprints_and_is_kept_once(tmp_path: Path) -> None:
    store = SqliteMonitorStore(tmp_path / "state.sqlite")
    store.keep_secret(b"a replay's secret")
    assert ExtractionMonitor(store)._secret == b"a replay's secret"
    with pytest.raises(ValueError, match="already holds"):
        store.keep_secret(b"another")
    store.close()


def test_the_monitor_needs_keys_and_the_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="needs API keys"):
        make_settings(tmp_path, gate="misinform", monitor="on")
    monkeypatch.setenv("DD_API_KEYS", ALICE)
    with pytest.raises(ValidationError, match="needs the gate"):
        make_settings(tmp_path, monitor="on")
    with pytest.raises(ValidationError, match="trust_rate cannot exceed"):
        make_settings(tmp_path, gate="misinform", monitor_threshold=0.1, monitor_trust_rate=0.2)
    make_settings(tmp_path, gate="misinform", monitor_threshold=0.1)  # the trust rate follows: half the threshold


def _settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: object):
    monkeypatch.setenv("DD_API_KEYS", f"{ALICE},{BOB}")
    monkeypatch.setenv("DD_ADMIN_KEYS", OPERATOR)
    options = {"gate": "misinform", "monitor": "on", "monitor_window": 10, "monitor_min_queries": 5}
    options["monitor_threshold"] = 0.5
    return make_settings(tmp_path, **(options | overrides))


def _ask(client, key: str, x: torch.Tensor):
    return client.post("/predict", json={"instances": [{"pixels": q.tolist()} for q in x]}, headers=bearer(key))


def test_an_escalated_key_gets_misinformation_for_its_digits_across_a_restart(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    test_digits = load_split("mnist", str(data_root), "test").tensors[0]
    digits, others = test_digits[:4], test_digits[4:8]  # not flagged by the shipped score
    noise = torch.rand((6, *SHAPE), generator=torch.Generator().manual_seed(0))
    victim, _ = load_checkpoint("lenet-mnist")
    with torch.no_grad():
        truths = {id(digits): victim(digits).softmax(-1), id(others): victim(others).softmax(-1)}
    settings = _settings(tmp_path, monkeypatch)

    def honest(response, sent: torch.Tensor = digits) -> bool:
        truth = truths[id(sent)]
        got = torch.tensor([p["probabilities"] for p in response.json()["predictions"]])
        if torch.allclose(got, truth, rtol=0, atol=PATH_ATOL):
            return True
        changed = [not torch.allclose(g, t, atol=CHANGED) for g, t in zip(got, truth, strict=True)]
        assert all(changed), "partly misinformed"
        return False

    with serving(app := create_app(settings)) as client:
        assert app.state.runtime.monitor.policy.trust_rate == 0.25, "the trust rate is half the threshold (0.5)"
        assert honest(_ask(client, ALICE, digits)), "a fresh key's digits get the victim's answers"
        assert _ask(client, ALICE, noise).status_code == 200  # escalated at the 9th query (5 of 9 flagged)
        r = _ask(client, ALICE, digits)
        assert r.status_code == 200 and not honest(r), "an escalated key's digits were answered honestly"
        assert set(r.json()["predictions"][0]) == {"label", "class_name", "probabilities", "attribution"}, (
            "the answer tells"
        )
        assert honest(_ask(client, BOB, others), others), "another key paid for Alice's escalation"
        admin = bearer(OPERATOR)
        assert client.get("/v1/admin/flags").status_code == 401
        assert client.get("/v1/admin/flags", headers=bearer(ALICE)).status_code == 401, "an API key opened admin"
        flags = client.get("/v1/admin/flags", headers=admin).json()["keys"]
        # 5 of 9 flagged at the 9th query; the request's 10 queries were all screened before its flags came in
        assert [(k["key_id"], k["escalated_after"], k["reason"]) for k in flags] == [
            (key_id_of(app, ALICE), 10, "domain")
        ]
        metrics = client.get("/metrics", headers=admin).text
        assert metric_value(metrics, "dd_flagged_keys") == 1
        anonymous = client.get("/metrics").text
        assert "dd_flagged_keys" not in anonymous and key_id_of(app, ALICE) not in anonymous, "anonymous /metrics tells"
        assert metric_value(metrics, 'dd_escalated_instances_total{action="misinform"}') == 4
    with serving(app := create_app(settings)) as client:  # a restart on the same database
        assert not honest(_ask(client, ALICE, digits)), "the escalation did not survive the restart"
        assert metric_value(client.get("/metrics", headers=bearer(OPERATOR)).text, "dd_flagged_keys") == 1
        assert client.delete(f"/v1/admin/flags/{key_id_of(app, ALICE)}", headers=bearer(OPERATOR)).status_code == 204
        missing = client.delete(f"/v1/admin/flags/{key_id_of(app, ALICE)}", headers=bearer(OPERATOR))
        assert missing.status_code == 404 and error_of(missing)["code"] == "not_flagged"
        assert honest(_ask(client, ALICE, digits)), "a cleared key is still misinformed"
        assert metric_value(client.get("/metrics", headers=bearer(OPERATOR)).text, "dd_flagged_keys") == 0


def test_a_trusted_keys_flagged_queries_are_answered_by_the_defense_and_retries_earn_no_trust(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window (10) of a key's distinct digits, none flagged, and the key is trusted: its noise, which the score
    flags, gets the defense's answer (here the victim's) until 2 of its last 10 are flagged (more than 12.5%).
    Bob sends one digit ten times: retries, recorded once, so his window is not full and his noise is
    misinformed."""
    digits = load_split("mnist", str(data_root), "test").tensors[0][:10]  # not flagged by the shipped score
    noise = torch.rand((3, *SHAPE), generator=torch.Generator().manual_seed(0))
    victim, _ = load_checkpoint("lenet-mnist")
    with torch.no_grad():
        truth = victim(noise).softmax(-1)

    def honest(response, sent: slice = slice(0, 1)) -> list[bool]:
        got = torch.tensor([p["probabilities"] for p in response.json()["predictions"]])
        return [torch.allclose(g, t, rtol=0, atol=PATH_ATOL) for g, t in zip(got, truth[sent], strict=True)]

    settings = _settings(tmp_path, monkeypatch, monitor_trust_rate=0.125)
    pin_monitor_secret(settings.budget_db)  # the digits' near-duplicate marks do not depend on a random secret
    with serving(create_app(settings)) as client:
        assert _ask(client, ALICE, digits[:9]).status_code == 200  # 9 in the window: not yet trusted
        assert honest(_ask(client, ALICE, noise[:1])) == [False], "a watched key's flagged query was not misinformed"
        assert _ask(client, ALICE, digits[9:]).status_code == 200  # 10 of 11 unflagged: window full, 1 of 10 flagged
        trusted = _ask(client, ALICE, noise[1:2])
        assert honest(trusted, slice(1, 2)) == [True], "a trusted key's flagged query was misinformed"
        # the window now holds 2 flagged of 10 (20%): watched again
        r = _ask(client, ALICE, noise[2:3])
        assert r.status_code == 200 and honest(r, slice(2, 3)) == [False], "flags stopped counting once trusted"
        metrics = client.get("/metrics", headers=bearer(OPERATOR)).text
        assert metric_value(metrics, "dd_trusted_flagged_answers_total") == 1
        assert metric_value(metrics, "dd_misinformed_answers_total") == 2
        for _ in range(10):
            assert _ask(client, BOB, digits[:1]).status_code == 200
        assert honest(_ask(client, BOB, noise[:1])) == [False], "retries filled a window"


def test_an_escalated_key_can_be_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    noise = torch.rand((5, *SHAPE), generator=torch.Generator().manual_seed(0))
    with serving(app := create_app(_settings(tmp_path, monkeypatch, monitor_action="refuse"))) as client:
        assert _ask(client, ALICE, noise).status_code == 200
        r = _ask(client, ALICE, noise[:1])
        assert r.status_code == 403 and error_of(r)["code"] == "key_flagged"
        assert ALICE not in r.text and key_id_of(app, ALICE) not in r.text
        assert _ask(client, BOB, noise[:1]).status_code == 200
        metrics = client.get("/metrics", headers=bearer(OPERATOR)).text
        assert metric_value(metrics, 'dd_escalated_instances_total{action="refuse"}') == 1


def test_screening_sees_twins_and_queries_grown_from_earlier_ones_but_not_digits(
    tmp_path: Path, data_root: Path
) -> None:
    """What the monitor sees of the queries themselves, with its default policy: an honest key's 400 test
    digits pass; a key that asks every image twice (one pixel moved by 1/255) is escalated for its
    near-duplicates; a key whose queries are Jacobian-style steps (±0.1 a pixel) from 100 seed digits
    and from each other is escalated by PRADA's statistic; and a fresh key that sends the escalated
    key's queries is tainted by them."""
    digits = load_split("mnist", str(data_root), "test").tensors[0]
    monitor = ExtractionMonitor(tmp_path / "state.sqlite")

    def screen(key: str, x: torch.Tensor, batch: int = 16) -> KeyWindow:
        for i in range(0, len(x), batch):
            monitor.screen(key, x[i : i + batch])
        return monitor.store.read(key)

    honest = screen("0" * 12, digits[:400])
    assert not honest.escalated and honest.spread is not None and honest.spread > MonitorPolicy().spread

    twin = digits[400:500].clone()
    twin[:, 0, 14, 14] = torch.where(
        twin[:, 0, 14, 14] < 0.5, twin[:, 0, 14, 14] + 1 / 255, twin[:, 0, 14, 14] - 1 / 255
    )
    twins = screen("1" * 12, torch.stack([digits[400:500], twin], 1).reshape(-1, *SHAPE))
    assert twins.reason == "duplicates" and twins.escalated_after <= 2 * MonitorPolicy().min_queries

    g = torch.Generator().manual_seed(0)
    grown = [digits[500:600]]
    for _ in range(2):  # two rounds of JBDA-like growth: every point so far, stepped by ±0.1 per pixel
        pool = torch.cat(grown)
        grown.append((pool + 0.1 * torch.randn(pool.shape, generator=g).sign()).clamp(0, 1))
    jbda = screen("2" * 12, torch.cat(grown))
    assert jbda.escalated and jbda.reason == "spread", (jbda.reason, jbda.spread)

    moved = screen("3" * 12, torch.cat(grown)[150:160])
    assert moved.escalated and moved.reason == "taint"
    assert not monitor.escalated("0" * 12)


def test_retries_and_public_images_sent_by_several_honest_keys_are_not_duplicates(
    tmp_path: Path, data_root: Path
) -> None:
    """An honest user who sends his 200 digits twice (a retry gets the same answer), and a second honest user who
    sends the same public digits, are not escalated: only a key's near-duplicates of its *own* earlier queries
    that are not the same bytes (twins) count, and another key's queries only when that key is escalated."""
    digits = load_split("mnist", str(data_root), "test").tensors[0][:200]
    pin_monitor_secret(tmp_path / "state.sqlite")  # at random, two of these digits share a fingerprint once in 230
    monitor = ExtractionMonitor(tmp_path / "state.sqlite")
    for key in ("a" * 12, "a" * 12, "b" * 12):
        for i in range(0, len(digits), 16):
            assert not monitor.screen(key, digits[i : i + 16]).escalated, key
    assert monitor.store.read("a" * 12).duplicates == 0 and monitor.store.read("b" * 12).duplicates == 0
