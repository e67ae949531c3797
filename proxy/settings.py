"""The settings as frozen dataclasses: what every part of thrifty reads, built once at start-up.

``proxy.config`` is the only place that builds them (from the YAML file and the environment,
with ``file:line`` errors); everything else only reads them. Defaults here are the defaults
a user gets with no configuration at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

# Providers spoken to directly over the OpenAI wire format (the hot path).
OPENAI_COMPATIBLE = frozenset({"openai", "openai-compatible", "llamacpp", "ollama", "vllm", "lmstudio"})
# Providers reached through litellm's adapters, imported only when one is configured.
LITELLM_PROVIDERS = frozenset({"anthropic"})
PROVIDERS = OPENAI_COMPATIBLE | LITELLM_PROVIDERS

DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "ollama": "http://127.0.0.1:11434/v1",
    "llamacpp": "http://127.0.0.1:8080/v1",
    "lmstudio": "http://127.0.0.1:1234/v1",
}
LOCAL_PROVIDERS = frozenset({"llamacpp", "ollama", "lmstudio", "vllm"})


@dataclass(frozen=True)
class Timeouts:
    """Seconds allowed to connect, to the first byte of the reply, and in all."""

    connect: float = 5.0
    first_byte: float = 120.0
    total: float = 600.0


@dataclass(frozen=True)
class ModelCapabilities:
    """The config's word on what a model can do (None: litellm's price map decides)."""

    tools: bool | None = None
    vision: bool | None = None
    json_schema: bool | None = None
    context_window: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    name: str
    provider: str
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    upstream_model: str = ""
    timeouts: Timeouts = field(default_factory=Timeouts)
    capabilities: ModelCapabilities = field(default_factory=ModelCapabilities)

    @property
    def is_local(self) -> bool:
        return self.provider in LOCAL_PROVIDERS

    @property
    def target_model(self) -> str:
        """The name sent upstream (``upstream_model``, else the client-facing name)."""
        return self.upstream_model or self.name


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 4000
    workers: int = 1
    max_body_bytes: int = 8 * 1024 * 1024
    drain_timeout: float = 30.0
    access_log: bool = False  # every request is in the ledger; this adds a log line each


@dataclass(frozen=True)
class AuthConfig:
    master_key: str | None = field(default=None, repr=False)
    # How long a looked-up key is trusted before the store is asked again: the bound on how
    # long a revoked key keeps working on another process.
    key_cache_seconds: float = 10.0


@dataclass(frozen=True)
class LedgerConfig:
    url: str = "sqlite:///thrifty.db"
    # Where records wait on disk while the store is unreachable (append-only, replayed on return).
    spill_dir: str = "thrifty-spill"
    # Records held in memory while the store is down, before they go to the spill file.
    buffer_records: int = 20_000
    # What a request for an alias with no price (``auto``) would have cost without thrifty: the
    # baseline its savings are measured against. None: the policy's default cloud target
    # (``proxy.pipeline.ledger.default_baseline``).
    baseline_model: str | None = None


@dataclass(frozen=True)
class PriceConfig:
    """An admin's price for one model, USD per 1M tokens."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None


BUDGET_SCOPES = ("key", "team", "app")
BUDGET_PERIODS = ("daily", "monthly")
NANO_PER_USD = 1_000_000_000


@dataclass(frozen=True)
class BudgetLimit:
    """One line of ``budgets.limits``: a spend limit for a key, team or app ("*": each one)."""

    scope: str  # key | team | app
    name: str  # an id or name, or "*" for every one of the scope separately
    period: str  # daily | monthly (UTC)
    soft_nusd: int | None = None  # crossing it adds a warning header; nano-dollars
    hard_nusd: int | None = None  # a request that could cross it is refused (429)


@dataclass(frozen=True)
class BudgetsConfig:
    # Shared spend across replicas; without it each process keeps its own.
    redis_url: str | None = field(default=None, repr=False)
    redis_cluster: bool = False
    limits: tuple[BudgetLimit, ...] = ()


@dataclass(frozen=True)
class RateLimit:
    """One line of ``rate_limits.limits``: requests and tokens a window for a key, team or app ("*": each one)."""

    scope: str  # key | team | app
    name: str  # an id or name, or "*" for every one of the scope separately
    rpm: int | None = None  # requests a window
    tpm: int | None = None  # prompt tokens plus output allowance a window (corrected to actual usage)


@dataclass(frozen=True)
class RateLimitsConfig:
    # Shared windows across replicas (the budgets' connection is reused for the same URL).
    redis_url: str | None = field(default=None, repr=False)
    redis_cluster: bool = False
    window_seconds: float = 60.0  # "per minute" unless changed
    limits: tuple[RateLimit, ...] = ()


CACHE_SCOPES = ("team", "key")
CACHE_MODES = ("exact", "semantic", "off")


@dataclass(frozen=True)
class CacheConfig:
    """The response cache (``cache:``): shared through Redis when ``redis_url`` is set, else per process."""

    enabled: bool = True
    redis_url: str | None = field(default=None, repr=False)
    redis_cluster: bool = False
    ttl_seconds: float = 3600.0
    scope: str = "team"  # team | key: whose requests may share answers
    max_entry_bytes: int = 262_144
    timeout_seconds: float = 0.1  # a slower Redis answer counts as a miss
    memory_entries: int = 10_000  # the in-process store's bounds
    memory_bytes: int = 64 * 1024 * 1024
    # exact | semantic (exact first, then by embedding) | off; a routing rule's cache.mode overrides it.
    mode: str = "exact"
    threshold: float | None = None  # semantic: least cosine similarity served; None: semantic_key.DEFAULT_THRESHOLD
    embedder: str = "local"  # "local" (all-MiniLM-L6-v2 in process) or a configured model's name (/v1/embeddings)
    semantic_max_per_tenant: int = 50_000  # entries per tenant in the semantic index, least recently used evicted


@dataclass(frozen=True)
class UpstreamConfig:
    """Failover (``upstream:``): retries, circuit breakers, and health probes of local backends."""

    retries: int = 1  # further tries of the same model on 429 / 5xx / connection errors
    retry_budget: float = 0.2  # retries per request, on average: a dead upstream is not sent N times the load
    backoff_base: float = 0.1  # seconds before the first retry (full jitter), doubling each time
    backoff_max: float = 2.0
    retry_after_max: float = 2.0  # a longer Retry-After: the next model instead of waiting
    breaker_failures: int = 5  # consecutive failures that open a model's circuit
    breaker_cooldown: float = 15.0  # seconds open before one probe request is let through
    probe_interval: float = 5.0  # seconds between GET {base_url}/models of local backends; 0: off


PRUNE_SUMMARY_ROLES = ("system", "user")


@dataclass(frozen=True)
class PruneConfig:
    """Context pruning (``prune:``): the default for requests no routing rule gives prune settings.

    No ``max_input_tokens`` / ``context_share`` here means no pruning unless a rule sets a budget
    or the request sends ``x-thrifty-max-input-tokens``; the other keys apply to every pruned request.
    """

    max_input_tokens: int | None = None
    context_share: float | None = None  # a share (0..1] of the target model's context window
    keep_last: int = 6
    summarize: bool = True
    summarizer: str = "extractive"  # "extractive" or a configured model name (a local SLM)
    summary_tokens: int = 300
    summary_role: str = "system"
    summary_timeout_seconds: float = 10.0
    summary_input_tokens: int = 1200  # how much of the dropped turns a model summarizer is shown
    tool_output_tokens: int = 1000
    allow_opt_out: bool = True


@dataclass(frozen=True)
class TelemetryConfig:
    """Telemetry (``telemetry:``): Prometheus ``/metrics`` on the main port, OTLP traces when an endpoint is set."""

    metrics: bool = True
    metrics_token: str | None = field(default=None, repr=False)  # set: /metrics wants it as a bearer token
    otlp_endpoint: str | None = None  # an OTLP/HTTP collector's base URL (…:4318); None: no traces, no SDK import
    service_name: str = "thrifty"
    # Not read from the file: the per-server directory ``thrifty serve --workers N`` creates, where
    # each worker leaves its figures so a scrape of any worker reports the whole server's.
    shared_dir: str | None = None


@dataclass(frozen=True)
class Settings:
    models: tuple[ModelConfig, ...] = ()
    auth: AuthConfig = field(default_factory=AuthConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    prices: Mapping[str, PriceConfig] = field(default_factory=dict)
    budgets: BudgetsConfig = field(default_factory=BudgetsConfig)
    rate_limits: RateLimitsConfig = field(default_factory=RateLimitsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    source: str | None = None
    # Zero-config mode: probe for local Ollama / llama.cpp servers at start-up.
    discover_local: bool = False
    # Where zero-config looks: (provider, base URL) pairs; OLLAMA_HOST / LLAMACPP_BASE_URL move them.
    local_servers: tuple[tuple[str, str], ...] = (
        ("ollama", DEFAULT_BASE_URLS["ollama"]),
        ("llamacpp", DEFAULT_BASE_URLS["llamacpp"]),
    )
    # The routing policy file (``policies:``); None: every request goes to the model it names.
    policies: str | None = None

    def secrets(self) -> tuple[str, ...]:
        """Every upstream API key, so logs and errors can be scrubbed of them."""
        return tuple(m.api_key for m in self.models if m.api_key)
