"""Server settings: environment variables prefixed `ICLSERVE_`, nested fields joined by `__`.

Nothing is read at import time: `Settings()` is built by the CLI (or a test) and handed to
`create_app`. Keys can be given as comma-separated values or, preferably, as files
(`ICLSERVE_ADMIN_KEYS_FILE`), which is how compose secrets arrive.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PACKAGED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class Upstream(BaseModel):
    """One OpenAI-compatible upstream. Requests reach it only through its `models` patterns."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    base_url: str = Field(description="Base URL including the /v1 prefix.")
    api_key: SecretStr | None = None
    api_key_file: Path | None = Field(None, description="File holding the key (compose secret).")
    models: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Model names or shell-style patterns (fnmatch) routed to this upstream.",
    )
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to open a connection.")
    first_byte_timeout: float = Field(
        60.0, gt=0, description="Seconds from sending the request to the response headers."
    )
    idle_timeout: float = Field(
        60.0, gt=0, description="Longest silence between two chunks of a response."
    )
    total_timeout: float = Field(300.0, gt=0, description="Deadline for the whole call.")
    max_retries: int = Field(
        2, ge=0, le=10, description="Retries on connect errors, 429 and 5xx before any byte."
    )
    max_retry_wait: float = Field(
        10.0, ge=0, description="Cap on the summed waits between retries (Retry-After included)."
    )
    breaker_enabled: bool = Field(
        True, description="Fail fast with 503 while this upstream keeps failing (circuit breaker)."
    )
    breaker_window: int = Field(
        20, ge=1, le=10_000, description="Breaker: how many of the latest calls the ratio covers."
    )
    breaker_min_calls: int = Field(
        20,
        ge=1,
        le=10_000,
        description="Breaker: calls the window must hold before the ratio can open it.",
    )
    breaker_failure_ratio: float = Field(
        0.5, gt=0, le=1, description="Breaker: opens when this share of the window failed."
    )
    breaker_consecutive_failures: int = Field(
        5, ge=1, le=10_000, description="Breaker: opens after this many failures in a row."
    )
    breaker_cooldown: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Breaker: seconds it stays open before one probe call is let through.",
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _key_from_file(self) -> Upstream:
        if self.api_key is None and self.api_key_file is not None:
            self.api_key = SecretStr(self.api_key_file.read_text(encoding="utf-8").strip())
        return self

    @model_validator(mode="after")
    def _breaker_window_holds_min_calls(self) -> Upstream:
        if self.breaker_min_calls > self.breaker_window:
            raise ValueError(
                f"breaker_min_calls ({self.breaker_min_calls}) cannot exceed breaker_window "
                f"({self.breaker_window}); set both"
            )
        return self

    def matches(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


class EmbeddingSettings(BaseModel):
    """Which embedder turns example inputs and queries into vectors."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["sentence_transformers", "openai", "hash"] = "sentence_transformers"
    model: str | None = Field(
        None,
        description="sentence-transformers model directory or name, or the remote model name "
        "(kind=openai). Default: the packaged all-MiniLM-L6-v2 (offline).",
    )
    device: str = "cpu"
    backend: Literal["auto", "onnx", "torch"] = Field(
        "auto",
        description="kind=sentence_transformers: run the model with ONNX Runtime (fast on CPU) "
        "or PyTorch. auto: ONNX on CPU when the model's layout allows it, else PyTorch.",
    )
    threads: int | None = Field(
        None, ge=1, le=256, description="ONNX Runtime threads per forward pass (CPU count)."
    )
    pin_threads: bool = Field(
        True,
        description="Pin a forward pass's threads to distinct CPUs when it follows an idle "
        "spell (ONNX backend, Linux); passes under load are never pinned.",
    )
    lone_query_session: bool = Field(
        True,
        description="ONNX backend: embed the query of a request that is the only one in "
        "flight with a second session (a fused graph, threads spinning during the pass): "
        "about 1 ms faster on 2 cores, for about 90 MiB more memory.",
    )
    onnx_cache_dir: Path | None = Field(
        None,
        description="Where exported ONNX graphs are kept (default: ~/.cache/iclserve/onnx; "
        "the export takes a few seconds once per model).",
    )
    batch_size: int = Field(64, ge=1, le=4096, description="Texts per embedding batch.")
    max_query_batch: int = Field(
        32,
        ge=1,
        le=1024,
        description="Concurrent query embeddings run as one batch, at most this many texts.",
    )
    base_url: str | None = Field(None, description="kind=openai: base URL including /v1.")
    api_key: SecretStr | None = None
    dim: int = Field(256, ge=8, le=8192, description="kind=hash: vector dimension.")
    timeout: float = Field(60.0, gt=0, description="kind=openai: seconds per request.")
    cache_size: int = Field(4096, ge=0, description="Query-embedding LRU entries (0 = off).")


class IndexSettings(BaseModel):
    """How a pool version's vectors are searched."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["auto", "flat", "hnsw"] = Field(
        "auto",
        description="flat: exact scan. hnsw: approximate graph search, exact re-rank. "
        "auto: flat below ann_min_size labeled examples, hnsw from there on.",
    )
    ann_min_size: int = Field(
        5_000,
        ge=1,
        description="kind=auto: pools with at least this many labeled examples use HNSW.",
    )
    hnsw_m: int = Field(32, ge=4, le=128, description="HNSW links per vector.")
    hnsw_ef_construction: int = Field(64, ge=8, le=2048, description="HNSW build width.")
    hnsw_ef_search: int = Field(
        256, ge=8, le=4096, description="HNSW search width (recall against speed)."
    )


class Limits(BaseModel):
    """Caps that keep one request from taking the server down."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_k: int = Field(64, ge=1)
    max_fetch_k: int = Field(1024, ge=1)
    max_rows_per_upload: int = Field(200_000, ge=1)
    max_field_chars: int = Field(20_000, ge=16)
    max_pools: int = Field(1000, ge=1)
    max_pool_rows: int = Field(2_000_000, ge=1)
    max_subset_budget: int = Field(10_000, ge=1)
    max_preset_calls: int = Field(
        50_000, ge=1, description="Most validation LLM calls one preset job may plan."
    )


def _split_keys(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _read_key_file(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [part.strip() for line in text.splitlines() for part in line.split(",") if part.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ICLSERVE_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    client_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    admin_keys_file: Path | None = None
    client_keys_file: Path | None = None

    upstreams: list[Upstream] = Field(default_factory=list)
    embedding: EmbeddingSettings = EmbeddingSettings()
    index: IndexSettings = IndexSettings()
    limits: Limits = Limits()
    default_k: int = Field(4, ge=1)
    upload_workers: int = Field(1, ge=1, le=4, description="Concurrent embedding jobs.")

    @field_validator("admin_keys", "client_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_keys(value)

    @model_validator(mode="after")
    def _keys_from_files(self) -> Settings:
        if self.admin_keys_file is not None:
            self.admin_keys = [
                *self.admin_keys,
                *map(SecretStr, _read_key_file(self.admin_keys_file)),
            ]
        if self.client_keys_file is not None:
            self.client_keys = [
                *self.client_keys,
                *map(SecretStr, _read_key_file(self.client_keys_file)),
            ]
        names = [u.name for u in self.upstreams]
        if len(names) != len(set(names)):
            raise ValueError("upstream names must be unique")
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.admin_keys or self.client_keys)

    def check_bind(self) -> None:
        """Refuse to serve beyond loopback when no key protects the API."""
        if self.auth_enabled:
            return
        try:
            loopback = ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            loopback = self.host == "localhost"
        if not loopback:
            raise ValueError(
                f"refusing to listen on {self.host} with no keys configured: set "
                "ICLSERVE_ADMIN_KEYS (or ICLSERVE_ADMIN_KEYS_FILE) or bind 127.0.0.1"
            )

    def upstream_for(self, model: str) -> Upstream | None:
        return next((u for u in self.upstreams if u.matches(model)), None)
