"""One typed settings object for every Atlas process.

Values come from, in rising precedence: field defaults, Atlas's legacy environment names
(`DEFAULT_DAILY_LIMIT`, ...), `ATLAS_*` environment variables, then command-line flags.
Settings are built in `main()` and passed explicitly; nothing reads the environment at import.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from atlas.errors import ConfigError
from atlas.limits import ENVOY_HEADROOM_BYTES
from atlas.pricing import ModelPrice
from atlas.windows import load_zone

Priority = Literal["low", "normal", "high", "critical"]
PRIORITIES: tuple[Priority, ...] = ("low", "normal", "high", "critical")


def _legacy(name: str) -> Any:
    """Accept `ATLAS_<NAME>` first, then Atlas's unprefixed `<NAME>`."""
    return AliasChoices(f"ATLAS_{name}", name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ATLAS_",
        extra="forbid",
        validate_default=True,
        populate_by_name=True,
        case_sensitive=False,
    )

    # --- shared state ---------------------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis/Valkey URL (redis:// or rediss://)"
    )
    redis_cluster: bool = Field(False, description="Use the Redis Cluster client")
    redis_timeout_s: float = Field(
        0.25, gt=0, description="Socket timeout for one Redis command, seconds"
    )
    redis_max_connections: int = Field(
        64, ge=1, description="Connections per process to Redis (callers wait for one)"
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for /v1/admin/*; `atlas up` generates one when unset"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of every service"
    )

    # --- service listeners ----------------------------------------------------------------
    authz_host: str = Field("127.0.0.1", description="ext_authz listen address")
    authz_port: int = Field(50051, ge=0, le=65535, description="ext_authz port")
    authz_protocol: Literal["http", "grpc"] = Field(
        "http",
        description="How Envoy calls authz: Envoy's HTTP ext_authz protocol (http_service, "
        "~15x less CPU per Check) or gRPC (grpc_service)",
    )
    extproc_host: str = Field("127.0.0.1", description="ext_proc gRPC listen address")
    extproc_port: int = Field(50052, ge=0, le=65535, description="ext_proc gRPC port")
    authz_metrics_port: int = Field(
        9102, ge=0, le=65535, description="authz Prometheus metrics port (0 = off)"
    )
    extproc_metrics_port: int = Field(
        9103, ge=0, le=65535, description="extproc Prometheus metrics port (0 = off)"
    )
    admin_host: str = Field("127.0.0.1", description="Admin REST listen address")
    admin_port: int = Field(8081, ge=0, le=65535, description="Admin REST port")
    envoy_admin_url: str | None = Field(
        None, description="Envoy admin URL that admin /healthz checks (e.g. http://127.0.0.1:9901)"
    )
    max_request_bytes: int = Field(
        8 << 20, gt=0, description="Largest request body Envoy accepts (larger: 413), bytes"
    )
    grpc_max_message_bytes: int = Field(
        32 << 20, gt=0, description="Max gRPC message size (bodies up to this reach extproc)"
    )

    # --- local stack (`atlas up`) ---------------------------------------------------------
    proxy_port: int = Field(8080, ge=0, le=65535, description="Envoy listener port (clients)")
    envoy_admin_port: int = Field(9901, ge=0, le=65535, description="Envoy admin port")
    envoy_concurrency: int = Field(2, ge=1, le=64, description="Envoy worker threads")
    upstream: str | None = Field(
        None, description="OpenAI-compatible upstream URL; a demo upstream runs when unset"
    )
    demo_upstream_port: int = Field(9000, ge=0, le=65535, description="Demo upstream port")

    # --- defaults for new keys (Atlas's names accepted as fallbacks) ----------------------
    default_daily_limit: int = Field(
        100_000,
        ge=0,
        validation_alias=_legacy("DEFAULT_DAILY_LIMIT"),
        description="Daily token quota of a new key",
    )
    default_monthly_limit: int = Field(
        2_000_000,
        ge=0,
        validation_alias=_legacy("DEFAULT_MONTHLY_LIMIT"),
        description="Monthly token quota of a new key",
    )
    default_rate_per_sec: float = Field(
        10.0,
        gt=0,
        validation_alias=_legacy("DEFAULT_RATE_PER_SEC"),
        description="Requests per second of a new key",
    )
    default_burst: int = Field(
        20,
        ge=1,
        validation_alias=_legacy("DEFAULT_BURST"),
        description="Request burst of a new key",
    )
    default_stream_reservation: int = Field(
        500,
        ge=1,
        validation_alias=_legacy("DEFAULT_STREAM_RESERVATION"),
        description="Completion tokens reserved when a request names no max_tokens",
    )
    max_reservation: int = Field(
        2000,
        ge=1,
        validation_alias=AliasChoices("ATLAS_MAX_RESERVATION", "MAX_STREAM_RESERVATION"),
        description="Upper bound of one request's reservation without max_tokens, tokens",
    )

    # --- admission -------------------------------------------------------------------------
    fail_mode: Literal["deny", "local"] = Field(
        "deny",
        description="Redis unreachable: deny (503) or local (per-replica limits from cached keys)",
    )
    shadow_mode: bool = Field(
        False, description="Evaluate and record every decision but admit everything"
    )
    clamp_max_tokens: bool = Field(
        False, description="Lower max_tokens to what a key has left instead of refusing"
    )
    capacity_tokens: int = Field(
        0, ge=0, description="In-flight reserved tokens the upstream can take (0 = no shedding)"
    )
    shed_low: float = Field(0.70, gt=0, le=1, description="Shed low above this share of capacity")
    shed_normal: float = Field(0.90, gt=0, le=1, description="Shed normal above this share")
    shed_high: float = Field(1.0, gt=0, le=1, description="Shed high above this share")
    inflight_sync_s: float = Field(
        0.1, gt=0, description="How often authz syncs the global in-flight count, seconds"
    )
    ceiling_low: float = Field(0.80, gt=0, le=1, description="Share of a quota low may use")
    ceiling_normal: float = Field(0.95, gt=0, le=1, description="Share of a quota normal may use")
    ceiling_high: float = Field(1.0, gt=0, le=1, description="Share of a quota high may use")
    ceiling_critical: float = Field(1.0, gt=0, le=1, description="Share critical may use")
    strip_client_key: bool = Field(
        True, description="Remove the client's Authorization header before the upstream"
    )
    upstream_api_key: SecretStr | None = Field(
        None, description="Credential sent upstream as `Authorization: Bearer` instead"
    )
    extra_endpoints: list[str] = Field(
        default_factory=list,
        description='More endpoints to forward, JSON list of "METHOD /path" (`*` globs), e.g.'
        ' ["POST /v1/images/*"]; rate limited per key, no tokens reserved',
    )
    authz_parse_workers: int = Field(
        1,
        ge=0,
        le=64,
        description="Processes that parse request bodies too complex to parse on authz's event"
        " loop (0 = refuse such bodies with 400)",
    )
    authz_parse_timeout_s: float = Field(
        0.3, gt=0, description="A body not parsed within this is refused (400), seconds"
    )

    model_prices: dict[str, ModelPrice] = Field(
        default_factory=dict,
        description='USD per 1M tokens, JSON: {"model": {"prompt": 2.5, "completion": 10}};'
        ' optional "cached_prompt", "cache_write" (default: prompt) and "reasoning" (default:'
        ' completion); "*" prices any other model (environment only)',
    )

    providers_file: str | None = Field(
        None,
        description="Providers file (YAML): upstream providers, their key pools and the model"
        " aliases they serve; see README 'Providers' and `atlas check-config`",
    )
    model_routes: dict[str, list[str]] = Field(
        default_factory=dict,
        description='Route by model, JSON: {"llama-3*": ["http://vllm-a:8000"], "gpt-4o": [...]};'
        " each model gets a cluster with health checks, retries and outlier detection;"
        " other models go to the default upstream (environment only)",
    )
    continuous_usage_models: list[str] = Field(
        default_factory=list,
        description="Models (names or globs, JSON list) whose upstream is vLLM or another"
        " server that takes stream_options.continuous_usage_stats: Atlas asks for usage on"
        " every streamed chunk, so a hang-up is charged exactly; never sent to others"
        " (OpenAI refuses unknown fields)",
    )
    tracked_models: list[str] = Field(
        default_factory=list,
        description="Models (names or globs, JSON list) always kept by name in metrics and"
        " history; priced and routed models are kept too",
    )
    max_tracked_models: int = Field(
        100,
        ge=0,
        le=10_000,
        description="Other distinct model names a process keeps by name; beyond, 'other'",
    )
    upstream_capacity_tokens_per_s: float = Field(
        0, ge=0, description="What the upstream can serve, tokens/s (capacity advice; 0 unknown)"
    )

    # --- accounting -----------------------------------------------------------------------
    reservation_ttl_s: int = Field(
        600, ge=1, description="A reservation not settled after this is reaped, seconds"
    )
    idempotency_ttl_s: int = Field(
        86_400,
        ge=60,
        le=30 * 86_400,
        description="How long a completed request's Idempotency-Key (and its stored response) "
        "is kept, s",
    )
    idempotency_max_response_bytes: int = Field(
        1 << 20,
        ge=0,
        le=16 << 20,
        description="Largest response kept for replaying a duplicate; a bigger one is refused "
        "(409) on retry",
    )
    claim_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A reservation no ext_proc stream claims within this is released, charged 0, s",
    )
    listener_tls_cert_file: str | None = Field(
        None, description="`atlas up`: Envoy serves TLS with this PEM certificate"
    )
    listener_tls_key_file: str | None = Field(None, description="`atlas up`: its private key")
    listener_client_ca_file: str | None = Field(
        None, description="`atlas up`: client certificates must chain to this CA (mTLS apps)"
    )
    mtls_identity: bool = Field(
        True,
        description="A request without an API key is identified by its mTLS principal (the "
        "URI or DNS SAN Envoy verified, from x-forwarded-client-cert or gRPC's source "
        "principal) when an app claims it. The Envoy in front must sanitize XFCC "
        "(forward_client_cert_details: SANITIZE_SET, as Atlas's bootstrap does); else false",
    )
    settle_from_access_log: bool = Field(
        True,
        description="Plain completions and streams Atlas only asks for usage are settled from "
        "Envoy's access log (json_to_metadata, the Lua filter; no ext_proc); the bootstrap must "
        "match (atlas render-envoy --no-access-log-settlement). Meshes without it: false",
    )
    stream_usage_from_envoy: bool = Field(
        False,
        description="Opt-in (Envoy >= 1.40's work-in-progress sse_to_metadata): a stream whose "
        "client asked for usage is settled from the access log (render-envoy --sse-usage)",
    )
    tokenizer: str = Field(
        "cl100k_base",
        description="tiktoken encoding that counts prompts and unreported completions "
        "(cl100k_base ships offline; o200k_base etc. need tokenizer_file); 'none': the "
        "calibrated estimator by character class only",
        max_length=64,
    )
    tokenizer_file: str = Field(
        "", description="Path of the tiktoken ranks file for `tokenizer` ('' = the packaged one)"
    )
    tokenizer_max_exact_chars: int = Field(
        1024,
        ge=0,
        le=1 << 20,
        description="Prompt characters tokenized exactly per request; the rest is estimated "
        "by character class (bounds the tokenizer's time on the request path)",
    )
    window_timezone: str = Field(
        "UTC",
        description="IANA time zone of the daily and monthly quota windows of keys without one"
        " of their own (DST included: a 23- or 25-hour day is one day)",
    )
    window_utc_offset_min: int = Field(
        0,
        ge=-14 * 60,
        le=14 * 60,
        description="Legacy: a fixed offset from UTC for the quota windows when"
        " window_timezone is UTC; also the grid of history hours, min",
    )
    history_days: int = Field(90, ge=1, description="Hourly usage history kept, days")
    reap_charge_reserved: bool = Field(
        True, description="Reaped (never settled) requests are charged their reservation"
    )
    quota_counts_cached: bool = Field(
        True,
        description="Prompt tokens read from the upstream's cache count toward token quotas"
        " and tokens/minute (false: they are left out; cache writes still count)",
    )
    journal_dir: str = Field(
        "", description="Where extproc journals settlements during a Redis outage ('' = temp dir)"
    )
    journal_max_bytes: int = Field(
        64 << 20, ge=4096, description="Journal size bound; beyond it the reaper charges"
    )
    reap_interval_s: float = Field(5.0, gt=0, description="How often extproc runs the reaper, s")
    request_log_days: int = Field(
        7, ge=1, le=400, description="Request log records kept, days (one stream per UTC day)"
    )
    request_log_max_per_day: int = Field(
        1_000_000,
        ge=1000,
        le=100_000_000,
        description="Request log records kept per day at most (older ones of the day are "
        "trimmed first; each is ~300 bytes of Redis memory)",
    )
    alert_thresholds: list[int] = Field(
        default_factory=lambda: [50, 80, 100],
        max_length=10,
        description="Percent of each quota and budget at which an alert fires, once per "
        "window (JSON list); a key's or team's alert rule overrides it",
    )
    alert_signing_secret: SecretStr | None = Field(
        None,
        description="HMAC-SHA256 secret that signs every webhook delivery "
        "(X-Atlas-Signature); unset: deliveries are unsigned",
    )
    alert_interval_s: float = Field(
        5.0, gt=0, le=3600, description="How often admin's alerter evaluates changed usage, s"
    )
    alert_anomaly_margin: float = Field(
        0.5,
        ge=0,
        le=100,
        description="The anomaly alert fires when an hour's tokens fall outside the "
        "forecast's 90% interval widened by this share of its width",
    )
    admin_jwt_issuer: str | None = Field(
        None, description="Admin single sign-on: the JWT issuer (iss) accepted"
    )
    admin_jwt_audience: str | None = Field(None, description="The JWT audience (aud) required")
    admin_jwt_jwks_file: str | None = Field(None, description="The issuer's JWKS, from a file")
    admin_jwt_jwks_url: str | None = Field(
        None, description="The issuer's JWKS, from a URL (cached, refetched on an unknown kid)"
    )
    admin_jwt_role_claim: str = Field(
        "atlas_role", description="The JWT claim naming the admin's role (viewer/operator/owner)"
    )
    key_cache_ttl_s: float = Field(
        30.0, ge=0, description="In-process key cache lifetime (pub/sub invalidates sooner), s"
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @field_validator("model_routes")
    @classmethod
    def _route_urls(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for model, urls in v.items():
            if not model or not urls:
                raise ValueError("each route needs a model name and at least one upstream URL")
            bad = [u for u in urls if not u.startswith(("http://", "https://"))]
            if bad:
                raise ValueError(f"{model}: not http(s) URLs: {bad}")
        return v

    @field_validator("alert_thresholds")
    @classmethod
    def _percentages(cls, v: list[int]) -> list[int]:
        if any(not 1 <= t <= 1000 for t in v):
            raise ValueError("each threshold is a percentage from 1 to 1000")
        return sorted(set(v))

    @field_validator("extra_endpoints")
    @classmethod
    def _endpoint_specs(cls, v: list[str]) -> list[str]:
        bad = [
            e
            for e in v
            if len(e.split()) != 2 or not e.split()[1].startswith("/") or e.split()[0] == "/"
        ]
        if bad:
            raise ValueError(f'each entry must be "METHOD /path", got: {bad}')
        return v

    @field_validator("window_timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        load_zone(v)  # raises ValueError naming the zone
        return v

    @field_validator("upstream")
    @classmethod
    def _upstream_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v

    @model_validator(mode="after")
    def _one_window_zone(self) -> Settings:
        if self.window_timezone != "UTC" and self.window_utc_offset_min:
            raise ValueError(
                "set window_timezone or the legacy window_utc_offset_min, not both: the"
                " offset applies only when the zone is UTC"
            )
        return self

    @model_validator(mode="after")
    def _bodies_fit_grpc(self) -> Settings:
        if self.grpc_max_message_bytes < self.max_request_bytes + ENVOY_HEADROOM_BYTES:
            raise ValueError(
                "grpc_max_message_bytes must be at least max_request_bytes + "
                f"{ENVOY_HEADROOM_BYTES}: authz and extproc receive whole request bodies "
                "(with their headers) in one gRPC message"
            )
        return self

    def admin_token_value(self) -> str:
        if self.admin_token is None:
            raise ConfigError("admin_token: not set (ATLAS_ADMIN_TOKEN)")
        return self.admin_token.get_secret_value()


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Build settings from the environment plus `overrides` (flags), reporting every error.

    :raises ConfigError: naming each bad setting by its env var, all at once.
    """
    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            problems.append(f"ATLAS_{field.upper()} ({field}): {err['msg']}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems)) from exc
