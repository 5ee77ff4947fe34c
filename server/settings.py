"""Server configuration: ``DD_*`` environment variables, overridden by ``deepdefense serve`` flags.

API keys are read only from ``DD_API_KEYS`` (comma-separated) or the file named by
``DD_API_KEYS_FILE`` (one key per line, ``#`` starts a comment), never from a flag, so that they do
not show up in process listings or shell history. Engine options go through unchanged as a dict:
``DD_ENGINE='{"steps": 10}'`` or ``DD_ENGINE__STEPS=10`` (values are read as JSON when they parse).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.checkpoint import resolve_checkpoint

DefenseName = Literal["deepdefense", "dd-s", "dd-i", "pp", "none"]


class ServerSettings(BaseSettings):
    """Everything ``deepdefense serve`` can be told; see ``docs/server.md``."""

    model_config = SettingsConfigDict(env_prefix="DD_", env_nested_delimiter="__", env_ignore_empty=True,
                                      extra="forbid")

    checkpoint: str = Field("lenet-mnist", description="shipped checkpoint name or path to its metadata JSON")
    defense: DefenseName = Field("deepdefense", description="`none` serves the undefended victim, by name only")
    interpreter: str = Field("gradcam", description="attribution method: gradcam, gradinput, relevancecam")
    device: str = Field("auto", description="auto (CUDA when present), cpu or cuda[:N]")
    engine: dict[str, Any] = Field(default_factory=dict, description="keyword options passed to the defense")
    data_root: str | None = Field(None, description="data sets, for layer sensitivity not stored in the checkpoint")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    max_instances: int = Field(16, ge=1, description="instances per request")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="request body size, enforced while reading")
    max_image_bytes: int = Field(2 << 20, ge=64, description="decoded size of one base64 image")
    max_image_pixels: int = Field(4_000_000, ge=1, description="declared width × height of one image")

    max_batch_size: int = Field(8, ge=1, description="instances per micro-batch (N)")
    max_batch_wait_ms: float = Field(5.0, ge=0, description="longest wait for a micro-batch to fill (M)")
    queue_size: int = Field(64, ge=1, description="queued instances before answering 503")
    request_timeout_s: float = Field(30.0, gt=0, description="end-to-end limit of one request before 504")
    retry_after_s: int = Field(1, ge=1, description="Retry-After of 503 answers")
    warmup: bool = Field(True, description="send one query through the defense before reporting ready")

    api_keys: SecretStr | None = Field(None, description="comma-separated API keys (environment only)")
    api_keys_file: FilePath | None = Field(None, description="file with one API key per line")
    query_budget: int | None = Field(None, ge=1, description="queries per API key, kept in budget_db")
    budget_db: Path = Field(Path("deepdefense-budget.sqlite"), description="SQLite file of spent budgets")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, value: str) -> str:
        resolve_checkpoint(value)
        return value

    @field_validator("engine", mode="after")
    @classmethod
    def _decode_engine_values(cls, value: dict[str, Any]) -> dict[str, Any]:
        """``DD_ENGINE__STEPS=10`` arrives as the string "10": read such values as JSON when they parse."""
        return {key: _json_or_str(v) for key, v in value.items()}

    @model_validator(mode="after")
    def _budget_needs_keys(self) -> ServerSettings:
        if self.query_budget is not None and not self.keys():
            raise ValueError("query_budget needs API keys (DD_API_KEYS or DD_API_KEYS_FILE)")
        return self

    def keys(self) -> list[str]:
        """The configured API keys, from the environment variable and the key file together."""
        keys = [k.strip() for k in self.api_keys.get_secret_value().split(",")] if self.api_keys else []
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                keys.append(line)
        return [k for k in keys if k]


def _json_or_str(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
