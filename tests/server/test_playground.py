"""The playground over plain HTTP (no browser): ``GET /`` is an HTML page whose script and style come from this
server only (no http:// or https:// anywhere in its files), shipped as package data; it uses the public API's
own field names; ``--playground off`` / ``DD_PLAYGROUND=off`` / the setting leave it out (404 JSON)."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from support.servers import bearer, error_of, serving
from support.settings import make_settings

from deepdefense.cli import build_parser
from deepdefense.commands.serve import settings_from_args
from deepdefense.defense import NoDefense
from deepdefense.server.app import create_app
from deepdefense.server.routes.playground import ASSETS
from deepdefense.server.schemas import Instance, Prediction, PredictRequest, PredictResponse
from deepdefense.server.settings import ServerSettings

pytestmark = pytest.mark.usefixtures("no_server_env")

REPO = Path(__file__).resolve().parents[2]
KEY = "playground-key-0123"
#: An address on another host without a scheme: src="//host/…", href='//…', url(//…), fetch("//…").
PROTOCOL_RELATIVE = re.compile(r"""(?:(?:src|href)\s*=\s*["']|url\(\s*["']?|fetch\(\s*["'`])//""")


@pytest.fixture
def client(tmp_path: Path, defense: NoDefense) -> Iterator[TestClient]:
    with serving(create_app(make_settings(tmp_path, api_keys=KEY), defense)) as c:
        yield c


def served_files(client: TestClient) -> dict[str, str]:
    page = client.get("/")
    files = {"/": page.text}
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        r = client.get(ref)
        assert r.status_code == 200, f"{ref} is referenced by the page but not served"
        files[ref] = r.text
    return files


def test_get_slash_is_the_playground_page(client: TestClient) -> None:
    r = client.get("/")  # open, although the API needs a key: the page holds no secret
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert '<canvas id="pad"' in r.text and '<canvas id="map"' in r.text
    assert 'id="invert"' in r.text and 'id="api-key"' in r.text
    assert client.get("/v1/models").status_code == 401, "the API stays behind the key"
    assert client.get("/v1/models", headers=bearer(KEY)).status_code == 200


def test_nothing_is_fetched_from_elsewhere(client: TestClient) -> None:
    files = served_files(client)
    assert set(files) == {"/", "/playground/playground.js", "/playground/playground.css"}
    for name, text in files.items():
        assert "http://" not in text and "https://" not in text, f"{name} names an address elsewhere"
        assert not PROTOCOL_RELATIVE.search(text), f"{name} names a protocol-relative address (//host/…)"
    assert client.get("/playground/playground.js").headers["content-type"].startswith("text/javascript")


def test_unknown_playground_files_are_404_json(client: TestClient) -> None:
    for path in ("/playground/secrets.txt", "/playground/../settings.py", "/playground/index.html"):
        r = client.get(path)
        assert r.status_code == 404
        assert error_of(r)["code"] == "not_found"


def test_the_page_speaks_the_public_api() -> None:
    """The field names the script sends and reads are the schemas' (a renamed field breaks this test)."""
    script = (REPO / "server" / "playground" / "playground.js").read_text()
    sent = {"instances", "explain", "invert"}
    assert sent <= set(PredictRequest.model_fields) and "image_b64" in Instance.model_fields
    read = {"predictions"} & set(PredictResponse.model_fields) | {"label", "probabilities", "attribution"}
    assert read <= set(PredictResponse.model_fields) | set(Prediction.model_fields)
    for name in (*sent, "image_b64", *read, "not_meant_for", "summary"):
        assert name in script, f"the page does not use {name!r}"
    assert '"/predict"' in script and '"/v1/models"' in script
    assert '"Bearer "' in script and "Authorization" in script


def test_off_hides_it(tmp_path: Path, defense: NoDefense, monkeypatch: pytest.MonkeyPatch) -> None:
    with serving(create_app(make_settings(tmp_path, playground="off"), defense)) as c:
        for path in ("/", "/playground/playground.js"):
            r = c.get(path)
            assert r.status_code == 404 and error_of(r)["code"] == "not_found"
        assert c.get("/v1/models").status_code == 200
    assert settings_from_args(build_parser().parse_args(["serve", "--playground", "off"])).playground == "off"
    assert settings_from_args(build_parser().parse_args(["serve"])).playground == "on"
    monkeypatch.setenv("DD_PLAYGROUND", "off")
    assert ServerSettings().playground == "off"
    monkeypatch.setenv("DD_PLAYGROUND", "maybe")
    with pytest.raises(ValueError, match="playground"):
        ServerSettings()


def test_the_page_ships_as_package_data() -> None:
    """Every file of server/playground/ matches the package data of pyproject.toml (a non-editable install has it)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["deepdefense.server"]
    folder = REPO / "server" / "playground"
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    assert set(files) == set(ASSETS)
    for name in files:
        assert any(fnmatch(f"playground/{name}", pattern) for pattern in patterns), name
