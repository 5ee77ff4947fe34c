"""Several models in one server (issue 33): each answers by name through ``/predict`` and ``/v2``, the first is the
default, an unknown name is 404, ``/readyz`` waits for all, metrics and budgets are per model, and an escalated key
is refused by a model without the gate."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from support.images import pixels
from support.numerics import PATH_ATOL, top1_margin
from support.redis_server import RedisServer
from support.servers import bearer, error_of, key_id_of, metric_value, serving
from support.settings import make_settings

from deepdefense.clients.oracle import PROTOCOLS, HttpOracle, OracleError
from deepdefense.measure.launcher import in_thread
from deepdefense.models.checkpoint import load_checkpoint
from deepdefense.server.app import create_app
from deepdefense.server.budget import QueryLedger, RedisLedger, budget_key
from deepdefense.server.cluster import settings_payload
from deepdefense.server.settings import ServerSettings
from deepdefense.server.state import connect_redis

pytestmark = pytest.mark.usefixtures("no_server_env")

MNIST, FASHION = "lenet-mnist", "lenet-fashionmnist"
BOTH = [MNIST, FASHION]
ALICE, BOB = "alice-key-0001-multi", "bob-key-0002-multi"


@pytest.fixture(scope="module")
def victims() -> dict[str, torch.nn.Module]:
    return {name: load_checkpoint(name)[0].eval() for name in BOTH}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with serving(create_app(make_settings(tmp_path, checkpoint=BOTH))) as c:
        yield c


def predict(client: TestClient, model: str | None = None, n: int = 1, key: str | None = None, **extra: Any) -> Any:
    body: dict[str, Any] = {"instances": [{"pixels": pixels(i)} for i in range(n)], "explain": False, **extra}
    if model is not None:
        body["model"] = model
    return client.post("/predict", json=body, headers=bearer(key) if key else {})


def infer(client: TestClient, model: str, key: str | None = None) -> Any:
    image = {"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": torch.tensor(pixels(0)).flatten()}
    body = {"inputs": [{**image, "data": image["data"].tolist()}]}
    return client.post(f"/v2/models/{model}/infer", json=body, headers=bearer(key) if key else {})


def local_probabilities(victim: torch.nn.Module) -> list[float]:
    with torch.no_grad():
        return torch.softmax(victim(torch.tensor([pixels(0)])), dim=1)[0].tolist()


# -- answering by name -------------------------------------------------------------------------------------------


def test_each_model_answers_by_name_and_the_first_is_the_default(
    client: TestClient, victims: dict[str, torch.nn.Module]
) -> None:
    assert [m["name"] for m in client.get("/v1/models").json()["models"]] == BOTH
    answers = {name: predict(client, name).json() for name in BOTH}
    for name, answer in answers.items():
        assert answer["model"] == name
        (p,) = answer["predictions"]
        assert p["probabilities"] == pytest.approx(local_probabilities(victims[name]), abs=1e-4), name
    fashion_classes = load_checkpoint(FASHION)[1].classes
    assert (
        answers[FASHION]["predictions"][0]["class_name"] == fashion_classes[answers[FASHION]["predictions"][0]["label"]]
    )
    assert answers[MNIST]["model_version"] != answers[FASHION]["model_version"]
    default = predict(client).json()
    assert default["model"] == MNIST and default["predictions"] == answers[MNIST]["predictions"]
    assert client.get("/v1/models/lenet-fashionmnist").json()["dataset"] == "fashionmnist"


def test_the_first_checkpoint_given_is_the_default(tmp_path: Path) -> None:
    with serving(create_app(make_settings(tmp_path, checkpoint=[FASHION, MNIST]))) as client:
        assert predict(client).json()["model"] == FASHION
        assert client.get("/readyz").json()["models"] == [FASHION, MNIST]


def test_the_open_inference_protocol_routes_by_name(client: TestClient, victims: dict[str, torch.nn.Module]) -> None:
    for name in BOTH:
        r = infer(client, name)
        assert r.status_code == 200 and r.json()["model_name"] == name
        probabilities = next(o for o in r.json()["outputs"] if o["name"] == "probabilities")["data"]
        assert probabilities == pytest.approx(local_probabilities(victims[name]), abs=1e-4), name
        assert client.get(f"/v2/models/{name}").json()["name"] == name
        assert client.get(f"/v2/models/{name}/ready").json() == {"name": name, "ready": True}
        assert client.get(f"/v2/models/{name}/config").json()["name"] == name


def test_an_unknown_model_is_404_naming_the_served_ones(client: TestClient) -> None:
    for r, field in (
        (predict(client, "lenet-cifar"), "model"),
        (infer(client, "lenet-cifar"), "model_name"),
        (client.get("/v2/models/lenet-cifar"), "model_name"),
        (client.get("/v1/models/lenet-cifar"), "model_name"),
    ):
        assert r.status_code == 404, r.text
        error = error_of(r)
        assert error["code"] == "model_not_found" and error["field"] == field
        assert "'lenet-mnist', 'lenet-fashionmnist'" in error["message"]
    r = predict(client, 7)  # type: ignore[arg-type]
    assert r.status_code == 422 and error_of(r)["field"] == "model"


def test_the_schema_lists_the_served_models(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    model = schema["components"]["schemas"]["PredictRequest"]["properties"]["model"]
    assert next(s for s in model["anyOf"] if s.get("type") == "string")["enum"] == BOTH
    (parameter,) = schema["paths"]["/v2/models/{model_name}/infer"]["post"]["parameters"][:1]
    assert parameter["schema"]["enum"] == BOTH


# -- readiness ---------------------------------------------------------------------------------------------------


def test_ready_only_when_every_model_is(client: TestClient) -> None:
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    assert client.get("/readyz").json() == {"status": "ready", "model": MNIST, "defense": "none", "models": BOTH}
    runtime.models[FASHION].phase = "starting"  # as while its defense is built
    for r in (client.get("/readyz"), client.get("/v2/health/ready")):
        assert r.status_code == 503 and "lenet-fashionmnist is still loading" in r.text
    assert predict(client, FASHION).status_code == 503 and infer(client, FASHION).status_code == 503
    assert predict(client, MNIST).status_code == 200, "a ready model answers while another loads"
    assert client.get("/v2/models/lenet-mnist/ready").status_code == 200
    runtime.models[FASHION].phase = "ready"
    assert client.get("/readyz").status_code == 200


# -- metrics -----------------------------------------------------------------------------------------------------


def test_the_series_are_labelled_per_model(client: TestClient) -> None:
    predict(client, MNIST, n=3)
    predict(client, FASHION, n=2)
    infer(client, FASHION)
    metrics = client.get("/metrics").text
    assert metric_value(metrics, f'dd_answers_total{{model="{MNIST}"}}') == 3
    assert metric_value(metrics, f'dd_answers_total{{model="{FASHION}"}}') == 3
    assert metric_value(metrics, f'dd_batch_instances_sum{{model="{FASHION}"}}') == 3
    for name in BOTH:
        assert metric_value(metrics, f'dd_server_info{{model="{name}",defense="none"}}') == 1


# -- budgets -----------------------------------------------------------------------------------------------------


def test_a_key_has_a_budget_per_model(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, checkpoint=BOTH, api_keys=f"{ALICE},{BOB}", query_budget=2))
    with serving(app) as client:
        assert predict(client, MNIST, n=2, key=ALICE).status_code == 200
        r = predict(client, MNIST, key=ALICE)
        assert r.status_code == 429 and error_of(r)["code"] == "budget_exhausted"
        assert infer(client, MNIST, key=ALICE).status_code == 429
        malformed = {"Content-Type": "application/json"} | bearer(ALICE)
        assert client.post("/predict", content=b"{", headers=malformed).status_code == 400, "a model has queries left"
        assert predict(client, FASHION, key=ALICE).status_code == 200, "the other model's budget is the key's own"
        assert infer(client, FASHION, key=ALICE).status_code == 200
        assert predict(client, FASHION, key=ALICE).status_code == 429
        r = client.post("/predict", content=b"{", headers=malformed)
        assert r.status_code == 429, "spent on every model: refused before the body is read"
        assert predict(client, MNIST, key=BOB).status_code == 200
        runtime = app.state.runtime
        alice = key_id_of(app, ALICE)
        assert [runtime.models[name].ledger.remaining(alice) for name in BOTH] == [0, 0]


def test_budgets_kept_before_they_were_per_model_carry_over_to_every_model(tmp_path: Path) -> None:
    path = tmp_path / "budget.sqlite"
    with sqlite3.connect(path) as old:  # a budget file of the one-model server
        old.execute("CREATE TABLE spent (key_id TEXT PRIMARY KEY, queries INTEGER NOT NULL)")
        old.execute("INSERT INTO spent VALUES ('k', 7)")
    ledgers = [QueryLedger(path, 10, name) for name in BOTH]
    assert [ledger.remaining("k") for ledger in ledgers] == [3, 3] and ledgers[0].remaining("other") == 10
    assert ledgers[0].spend("k", 3) == 0 and ledgers[1].remaining("k") == 3
    for ledger in ledgers:
        ledger.close()
    again = QueryLedger(path, 10, MNIST)
    assert again.remaining("k") == 0, "the old spend was copied again over the model's own"
    again.close()


def test_redis_budgets_kept_before_they_were_per_model_carry_over(redis_server: RedisServer) -> None:
    kid = "0123456789ab"
    with redis_server.client() as raw:
        raw.set(f"dd:budget:{kid}", 7)
    ledgers = [RedisLedger(connect_redis(redis_server.url), 10, name) for name in BOTH]
    try:
        assert [ledger.remaining(kid) for ledger in ledgers] == [3, 3]
        assert ledgers[0].spend(kid, 3) == 0 and ledgers[1].remaining(kid) == 3
        again = RedisLedger(connect_redis(redis_server.url), 10, MNIST)
        assert again.remaining(kid) == 0, "the old spend was copied again over the model's own"
        again.close()
    finally:
        for ledger in ledgers:
            ledger.close()
    with redis_server.client() as raw:
        assert raw.get(budget_key(FASHION, kid)) == "7" and raw.get(f"dd:budget:{kid}") == "7"


# -- the monitor -------------------------------------------------------------------------------------------------


def test_an_escalated_key_is_misinformed_by_the_gated_model_and_refused_by_the_other(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, checkpoint=BOTH, gate="auto", api_keys=f"{ALICE},{BOB}", admin_keys=ALICE)
    app = create_app(settings)
    with serving(app) as client:
        runtime = app.state.runtime
        assert runtime.models[MNIST].gated and not runtime.models[FASHION].gated
        runtime.monitor.observe(key_id_of(app, ALICE), [True] * 60)  # escalated (as by another request)
        r = predict(client, FASHION, key=ALICE)
        assert r.status_code == 403 and error_of(r)["code"] == "key_flagged", "no misinformation to give: refused"
        assert infer(client, FASHION, key=ALICE).status_code == 403
        assert predict(client, MNIST, key=ALICE).status_code == 200, "the gated model misinforms it"
        assert predict(client, FASHION, key=BOB).status_code == 200
        metrics = client.get("/metrics", headers=bearer(ALICE)).text
    escalated = 'dd_escalated_instances_total{{model="{}",action="{}"}}'
    assert metric_value(metrics, escalated.format(FASHION, "refuse")) == 2
    assert metric_value(metrics, escalated.format(MNIST, "misinform")) == 1
    assert metric_value(metrics, escalated.format(MNIST, "refuse")) == 0


# -- the client --------------------------------------------------------------------------------------------------


def test_the_http_oracle_asks_a_named_model_through_either_route(tmp_path: Path) -> None:
    x = torch.tensor([pixels(i) for i in range(3)])
    with in_thread(create_app(make_settings(tmp_path, checkpoint=BOTH))) as url:
        replies = {}
        for protocol in PROTOCOLS:
            with HttpOracle(url, model=FASHION, protocol=protocol, max_instances=2) as oracle:
                assert oracle.info().name == FASHION and oracle.info().dataset == "fashionmnist"
                replies[protocol] = oracle.query(x, explain=True)
        with HttpOracle(url) as default:
            mnist = default.query(x, explain=False)
        with HttpOracle(url, model="lenet-cifar") as unknown, pytest.raises(OracleError, match="lenet-mnist"):
            unknown.info()
    predicted, inferred = replies["predict"], replies["v2"]
    # each route's encoding rounds the floats its own way: probabilities within a tolerance, labels exactly,
    # as no top-1 is anywhere near a tie
    assert top1_margin(predicted.probabilities).min() > 100 * PATH_ATOL, "a near-tie: the top-1 may differ by route"
    assert torch.equal(predicted.labels, inferred.labels)
    assert torch.allclose(predicted.probabilities, inferred.probabilities, atol=1e-6)
    assert predicted.attributions is not None and inferred.attributions is not None
    assert predicted.attributions.shape == inferred.attributions.shape == (3, 28, 28)
    assert not torch.allclose(predicted.probabilities, mnist.probabilities), "the default model answered"


# -- settings ----------------------------------------------------------------------------------------------------


def test_checkpoints_from_the_environment_the_flags_and_for_the_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepdefense.cli import build_parser
    from deepdefense.commands.serve import settings_from_args

    monkeypatch.setenv("DD_CHECKPOINT", "lenet-mnist, lenet-fashionmnist")
    assert ServerSettings().checkpoint == BOTH
    args = build_parser().parse_args(["serve", "--checkpoint", FASHION, "--checkpoint", MNIST])
    assert settings_from_args(args).checkpoint == [FASHION, MNIST], "the flags override the environment"
    assert settings_payload(ServerSettings())["checkpoint"] == BOTH


def test_two_checkpoints_of_one_name_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="two checkpoints are named 'lenet-mnist'"):
        ServerSettings(checkpoint=[MNIST, "models/checkpoints/lenet-mnist.json"])
    with pytest.raises(ValueError, match="at least one checkpoint"):
        ServerSettings(checkpoint=" , ")


def test_the_watermark_marks_the_default_models_answers_only(tmp_path: Path) -> None:
    """Watermark records are kept per key, and ``ownership verify`` checks them against one model: the default."""
    from deepdefense.server.runtime import Runtime

    runtime = Runtime(make_settings(tmp_path, checkpoint=BOTH, api_keys=ALICE, watermark="on"))
    try:
        assert runtime.watermark is not None and runtime.models[MNIST].watermark is runtime.watermark
        assert runtime.models[FASHION].watermark is None
    finally:
        runtime.watermark.close()
