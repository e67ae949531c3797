"""Settings: the only reader of the environment and of the configuration file.

``load_settings`` runs once at start-up (and in each CLI command). It reads the YAML file
named by ``--config`` or ``THRIFTY_CONFIG``, substitutes ``${ENV}`` references, validates
every key into the frozen dataclasses of ``proxy.settings`` and raises :class:`ConfigError` naming the key and the
line of the first problem. With no file at all it builds a zero-config ``Settings``:
an SQLite ledger in the working directory, models from ``OPENAI_API_KEY`` /
``ANTHROPIC_API_KEY``, and local servers probed at start-up (``proxy.discovery``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from proxy import yamlsource
from proxy.errors import ConfigError
from proxy.settings import (
    BUDGET_PERIODS,
    BUDGET_SCOPES,
    CACHE_MODES,
    CACHE_SCOPES,
    DEFAULT_BASE_URLS,
    NANO_PER_USD,
    PROVIDERS,
    PRUNE_SUMMARY_ROLES,
    AuthConfig,
    BudgetLimit,
    BudgetsConfig,
    CacheConfig,
    LedgerConfig,
    ModelCapabilities,
    ModelConfig,
    PriceConfig,
    PruneConfig,
    RateLimit,
    RateLimitsConfig,
    ServerConfig,
    Settings,
    TelemetryConfig,
    Timeouts,
    UpstreamConfig,
)
from proxy.yamlread import read_int, read_money, read_seconds, read_section, read_str, reject_unknown
from proxy.yamlsource import Document


def load_settings(path: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the configuration named by ``path`` or ``THRIFTY_CONFIG``, else zero-config."""
    env = os.environ if env is None else env
    path = path or env.get("THRIFTY_CONFIG") or None
    if path is None:
        return replace(zero_config(env), policies=_default_policies())
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", source=str(path)) from None
    doc = yamlsource.parse(text, str(path), env)
    return replace(from_document(doc, env), policies=_policies(doc))


DEFAULT_POLICIES = "policies/default.yaml"


def _default_policies() -> str | None:
    return DEFAULT_POLICIES if Path(DEFAULT_POLICIES).is_file() else None


def _policies(doc: Document) -> str | None:
    """``policies:`` a file path (relative to the working directory), or false for none; default if present."""
    data = doc.data if isinstance(doc.data, dict) else {}
    if "policies" not in data:
        return _default_policies()
    value = data["policies"]
    if value is False or value is None:
        return None
    return read_str(doc, ("policies",), value, required=True)


def zero_config(env: Mapping[str, str]) -> Settings:
    models = []
    if env.get("OPENAI_API_KEY"):
        base = env.get("OPENAI_BASE_URL") or DEFAULT_BASE_URLS["openai"]
        for name in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "text-embedding-3-small"):
            models.append(ModelConfig(name, "openai", base, env["OPENAI_API_KEY"]))
    if env.get("ANTHROPIC_API_KEY"):
        for name in ("claude-sonnet-4-5", "claude-haiku-4-5"):
            models.append(ModelConfig(name, "anthropic", DEFAULT_BASE_URLS["anthropic"], env["ANTHROPIC_API_KEY"]))
    master = env.get("THRIFTY_MASTER_KEY") or None
    if master is not None and len(master) < 16:
        raise ConfigError("THRIFTY_MASTER_KEY: must be at least 16 characters")
    auth = AuthConfig(master_key=master)
    return Settings(models=tuple(models), auth=auth, discover_local=True, local_servers=local_servers(env))


def local_servers(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Where zero-config probes: Ollama's own ``OLLAMA_HOST`` (``host:port`` or a URL) and
    ``LLAMACPP_BASE_URL`` (the server's ``/v1`` URL), else their default ports on loopback."""
    ollama = DEFAULT_BASE_URLS["ollama"]
    host = env.get("OLLAMA_HOST", "").strip().rstrip("/")
    if host:
        url = host if "://" in host else f"http://{host}"
        ollama = url if url.endswith("/v1") else f"{url}/v1"
    llamacpp = env.get("LLAMACPP_BASE_URL", "").strip().rstrip("/") or DEFAULT_BASE_URLS["llamacpp"]
    return (("ollama", ollama), ("llamacpp", llamacpp))


_TOP_KEYS = {"models", "auth", "ledger", "server", "prices", "budgets", "rate_limits", "cache", "upstream", "prune", "telemetry"}


def from_document(doc: Document, env: Mapping[str, str]) -> Settings:
    data = doc.data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise doc.error((), "the config file must be a mapping of sections")
    reject_unknown(doc, (), data, {*_TOP_KEYS, "policies"})
    models = _models(doc, data.get("models", []))
    auth = _auth(doc, data.get("auth", {}), env)
    ledger = _ledger(doc, data.get("ledger", {}))
    server = _server(doc, data.get("server", {}))
    prices = _prices(doc, data.get("prices", {}))
    budgets = _budgets(doc, data.get("budgets", {}))
    rate_limits = _rate_limits(doc, data.get("rate_limits", {}))
    cache = _cache(doc, data.get("cache", {}), {m.name for m in models})
    upstream = _upstream(doc, data.get("upstream", {}))
    prune = _prune(doc, data.get("prune", {}), {m.name for m in models})
    telemetry = _telemetry(doc, data.get("telemetry", {}))
    return Settings(
        models=models,
        auth=auth,
        ledger=ledger,
        server=server,
        prices=prices,
        budgets=budgets,
        rate_limits=rate_limits,
        cache=cache,
        upstream=upstream,
        prune=prune,
        telemetry=telemetry,
        source=doc.source,
    )


def _telemetry(doc: Document, data: Any) -> TelemetryConfig:
    data = read_section(doc, ("telemetry",), data, {"metrics", "metrics_token", "otlp_endpoint", "service_name"})
    base = TelemetryConfig()
    if not isinstance(data.get("metrics", True), bool):
        raise doc.error(("telemetry", "metrics"), "must be true or false")
    token = read_str(doc, ("telemetry", "metrics_token"), data.get("metrics_token")) or None
    if token is not None and len(token) < 16:
        raise doc.error(("telemetry", "metrics_token"), "must be at least 16 characters")
    endpoint = read_str(doc, ("telemetry", "otlp_endpoint"), data.get("otlp_endpoint")) or None
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise doc.error(("telemetry", "otlp_endpoint"), "must be an http:// or https:// URL (OTLP/HTTP, e.g. port 4318)")
    name = read_str(doc, ("telemetry", "service_name"), data.get("service_name", base.service_name), required=True)
    return TelemetryConfig(metrics=data.get("metrics", True), metrics_token=token, otlp_endpoint=endpoint, service_name=name)


def _prune(doc: Document, data: Any, models: set[str]) -> PruneConfig:
    base = PruneConfig()
    data = read_section(doc, ("prune",), data, set(PruneConfig.__dataclass_fields__))

    def path(key: str) -> yamlsource.Path:
        return ("prune", key)

    for flag in ("summarize", "allow_opt_out"):
        if not isinstance(data.get(flag, True), bool):
            raise doc.error(path(flag), "must be true or false")
    share = data.get("context_share")
    if share is not None and (isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1):
        raise doc.error(path("context_share"), "must be a number in (0, 1]")
    if share is not None and data.get("max_input_tokens") is not None:
        raise doc.error(path("context_share"), "give max_input_tokens or context_share, not both")
    summarizer = read_str(doc, path("summarizer"), data.get("summarizer", base.summarizer), required=True)
    if summarizer != "extractive" and summarizer not in models:
        raise doc.error(path("summarizer"), f"must be extractive or a configured model name, not {summarizer!r}")
    role = read_str(doc, path("summary_role"), data.get("summary_role", base.summary_role), required=True)
    if role not in PRUNE_SUMMARY_ROLES:
        raise doc.error(path("summary_role"), f"must be one of {', '.join(PRUNE_SUMMARY_ROLES)}, not {role!r}")
    budget = data.get("max_input_tokens")

    def number(key: str, low: int) -> int:
        return read_int(doc, path(key), data.get(key, getattr(base, key)), low)

    return PruneConfig(
        max_input_tokens=None if budget is None else read_int(doc, path("max_input_tokens"), budget, 64),
        context_share=None if share is None else float(share),
        keep_last=number("keep_last", 0),
        summarize=data.get("summarize", base.summarize),
        summarizer=summarizer,
        summary_tokens=number("summary_tokens", 32),
        summary_role=role,
        summary_timeout_seconds=read_seconds(
            doc, path("summary_timeout_seconds"), data.get("summary_timeout_seconds", base.summary_timeout_seconds)
        ),
        summary_input_tokens=number("summary_input_tokens", 64),
        tool_output_tokens=number("tool_output_tokens", 32),
        allow_opt_out=data.get("allow_opt_out", base.allow_opt_out),
    )


def _upstream(doc: Document, data: Any) -> UpstreamConfig:
    base = UpstreamConfig()
    data = read_section(doc, ("upstream",), data, set(UpstreamConfig.__dataclass_fields__))

    def number(key: str, *, zero: bool = False) -> float:
        value = data.get(key, getattr(base, key))
        if zero and value in (0, "0"):
            return 0.0
        return read_seconds(doc, ("upstream", key), value)

    budget = data.get("retry_budget", base.retry_budget)
    if isinstance(budget, bool) or not isinstance(budget, int | float) or budget < 0:
        raise doc.error(("upstream", "retry_budget"), "must be a non-negative number (retries per request)")
    return UpstreamConfig(
        retries=read_int(doc, ("upstream", "retries"), data.get("retries", base.retries), 0, 10),
        retry_budget=float(budget),
        backoff_base=number("backoff_base"),
        backoff_max=number("backoff_max"),
        retry_after_max=number("retry_after_max", zero=True),
        breaker_failures=read_int(doc, ("upstream", "breaker_failures"), data.get("breaker_failures", base.breaker_failures), 1),
        breaker_cooldown=number("breaker_cooldown"),
        probe_interval=number("probe_interval", zero=True),
    )


def _ledger(doc: Document, data: Any) -> LedgerConfig:
    data = read_section(doc, ("ledger",), data, {"url", "spill_dir", "buffer_records", "baseline_model"})
    base = LedgerConfig()
    url = read_str(doc, ("ledger", "url"), data.get("url", base.url))
    if not url.startswith(("sqlite://", "postgresql://", "postgres://")):
        raise doc.error(("ledger", "url"), "must start with sqlite:// or postgresql://")
    return LedgerConfig(
        url=url,
        spill_dir=read_str(doc, ("ledger", "spill_dir"), data.get("spill_dir", base.spill_dir), required=True),
        buffer_records=read_int(doc, ("ledger", "buffer_records"), data.get("buffer_records", base.buffer_records), 100),
        baseline_model=read_str(doc, ("ledger", "baseline_model"), data.get("baseline_model")) or None,
    )


def _prices(doc: Document, data: Any) -> dict[str, PriceConfig]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise doc.error(("prices",), "must map model names to {input, output, cached_input} in USD per 1M tokens")
    out = {}
    for model, entry in data.items():
        path = ("prices", model)
        entry = read_section(doc, path, entry, {"input", "output", "cached_input"})
        if "input" not in entry or "output" not in entry:
            raise doc.error(path, "needs input and output (USD per 1M tokens)")
        cached = entry.get("cached_input")
        out[model] = PriceConfig(
            input=read_money(doc, (*path, "input"), entry["input"]),
            output=read_money(doc, (*path, "output"), entry["output"]),
            cached_input=None if cached is None else read_money(doc, (*path, "cached_input"), cached),
        )
    return out


def _budgets(doc: Document, data: Any) -> BudgetsConfig:
    data = read_section(doc, ("budgets",), data, {"redis_url", "redis_cluster", "limits"})
    redis_url = read_str(doc, ("budgets", "redis_url"), data.get("redis_url")) or None
    if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise doc.error(("budgets", "redis_url"), "must start with redis://, rediss:// or unix://")
    cluster = data.get("redis_cluster", False)
    if not isinstance(cluster, bool):
        raise doc.error(("budgets", "redis_cluster"), "must be true or false")
    items = data.get("limits") or []
    if not isinstance(items, list):
        raise doc.error(("budgets", "limits"), "must be a list of {key|team|app, period, soft_usd, hard_usd}")
    limits: dict[tuple[str, str, str], BudgetLimit] = {}
    for index, item in enumerate(items):
        limit = _budget_limit(doc, ("budgets", "limits", index), item)
        if (limit.scope, limit.name, limit.period) in limits:
            raise doc.error(("budgets", "limits", index), f"a {limit.period} {limit.scope} {limit.name!r} budget is set twice")
        limits[limit.scope, limit.name, limit.period] = limit
    return BudgetsConfig(redis_url=redis_url, redis_cluster=cluster, limits=tuple(limits.values()))


def _rate_limits(doc: Document, data: Any) -> RateLimitsConfig:
    data = read_section(doc, ("rate_limits",), data, {"redis_url", "redis_cluster", "window_seconds", "limits"})
    redis_url = read_str(doc, ("rate_limits", "redis_url"), data.get("redis_url")) or None
    if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise doc.error(("rate_limits", "redis_url"), "must start with redis://, rediss:// or unix://")
    if not isinstance(data.get("redis_cluster", False), bool):
        raise doc.error(("rate_limits", "redis_cluster"), "must be true or false")
    window = read_seconds(doc, ("rate_limits", "window_seconds"), data.get("window_seconds", 60.0))
    items = data.get("limits") or []
    if not isinstance(items, list):
        raise doc.error(("rate_limits", "limits"), "must be a list of {key|team|app, rpm, tpm}")
    limits: dict[tuple[str, str], RateLimit] = {}
    for index, item in enumerate(items):
        path: yamlsource.Path = ("rate_limits", "limits", index)
        item = read_section(doc, path, item, {*BUDGET_SCOPES, "rpm", "tpm"})
        scopes = [s for s in BUDGET_SCOPES if s in item]
        if len(scopes) != 1:
            raise doc.error(path, 'needs exactly one of key, team or app (a name, or "*" for each one separately)')
        name = read_str(doc, (*path, scopes[0]), item[scopes[0]], required=True)
        rpm, tpm = (None if item.get(k) is None else read_int(doc, (*path, k), item[k], 1) for k in ("rpm", "tpm"))
        if rpm is None and tpm is None:
            raise doc.error(path, "needs rpm, tpm or both")
        if (scopes[0], name) in limits:
            raise doc.error(path, f"a rate limit for {scopes[0]} {name!r} is set twice")
        limits[scopes[0], name] = RateLimit(scopes[0], name, rpm, tpm)
    cluster = bool(data.get("redis_cluster", False))
    return RateLimitsConfig(redis_url=redis_url, redis_cluster=cluster, window_seconds=window, limits=tuple(limits.values()))


def _cache(doc: Document, data: Any, models: set[str]) -> CacheConfig:
    keys = {"enabled", "redis_url", "redis_cluster", "ttl_seconds", "scope", "max_entry_bytes", "timeout_seconds"}
    semantic = {"mode", "threshold", "embedder", "semantic_max_per_tenant"}
    data = read_section(doc, ("cache",), data, keys | semantic | {"memory_entries", "memory_bytes"})
    base = CacheConfig()
    redis_url = read_str(doc, ("cache", "redis_url"), data.get("redis_url")) or None
    if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise doc.error(("cache", "redis_url"), "must start with redis://, rediss:// or unix://")
    for flag in ("enabled", "redis_cluster"):
        if not isinstance(data.get(flag, False), bool):
            raise doc.error(("cache", flag), "must be true or false")
    scope = read_str(doc, ("cache", "scope"), data.get("scope", base.scope))
    if scope not in CACHE_SCOPES:
        raise doc.error(("cache", "scope"), f"must be one of {', '.join(CACHE_SCOPES)}, not {scope!r}")
    return CacheConfig(
        enabled=data.get("enabled", base.enabled),
        redis_url=redis_url,
        redis_cluster=data.get("redis_cluster", base.redis_cluster),
        ttl_seconds=read_seconds(doc, ("cache", "ttl_seconds"), data.get("ttl_seconds", base.ttl_seconds)),
        scope=scope,
        max_entry_bytes=read_int(doc, ("cache", "max_entry_bytes"), data.get("max_entry_bytes", base.max_entry_bytes), 1024),
        timeout_seconds=read_seconds(doc, ("cache", "timeout_seconds"), data.get("timeout_seconds", base.timeout_seconds)),
        memory_entries=read_int(doc, ("cache", "memory_entries"), data.get("memory_entries", base.memory_entries), 1),
        memory_bytes=read_int(doc, ("cache", "memory_bytes"), data.get("memory_bytes", base.memory_bytes), 1024),
        **_semantic_cache(doc, data, models),
    )


def _semantic_cache(doc: Document, data: dict[str, Any], models: set[str]) -> dict[str, Any]:
    base = CacheConfig()
    mode = read_str(doc, ("cache", "mode"), data.get("mode", base.mode))
    if mode not in CACHE_MODES:
        raise doc.error(("cache", "mode"), f"must be one of {', '.join(CACHE_MODES)}, not {mode!r}")
    threshold = data.get("threshold")
    number = isinstance(threshold, int | float) and not isinstance(threshold, bool)
    if threshold is not None and (not number or not 0 < threshold <= 1):
        raise doc.error(("cache", "threshold"), "must be a cosine similarity in (0, 1]")
    embedder = read_str(doc, ("cache", "embedder"), data.get("embedder", base.embedder), required=True)
    if embedder != "local" and embedder not in models:
        raise doc.error(("cache", "embedder"), f'must be "local" or a model configured under models:, not {embedder!r}')
    cap = data.get("semantic_max_per_tenant", base.semantic_max_per_tenant)
    return {
        "mode": mode,
        "threshold": None if threshold is None else float(threshold),
        "embedder": embedder,
        "semantic_max_per_tenant": read_int(doc, ("cache", "semantic_max_per_tenant"), cap, 1),
    }


def _budget_limit(doc: Document, path: yamlsource.Path, item: Any) -> BudgetLimit:
    item = read_section(doc, path, item, {*BUDGET_SCOPES, "period", "soft_usd", "hard_usd"})
    scopes = [s for s in BUDGET_SCOPES if s in item]
    if len(scopes) != 1:
        raise doc.error(path, 'needs exactly one of key, team or app (a name, or "*" for each one separately)')
    scope = scopes[0]
    name = read_str(doc, (*path, scope), item[scope], required=True)
    period = read_str(doc, (*path, "period"), item.get("period"), required=True)
    if period not in BUDGET_PERIODS:
        raise doc.error((*path, "period"), f"must be one of {', '.join(BUDGET_PERIODS)}, not {period!r}")
    soft = None if item.get("soft_usd") is None else read_usd(doc, (*path, "soft_usd"), item["soft_usd"])
    hard = None if item.get("hard_usd") is None else read_usd(doc, (*path, "hard_usd"), item["hard_usd"])
    if soft is None and hard is None:
        raise doc.error(path, "needs soft_usd, hard_usd or both")
    if soft is not None and hard is not None and soft > hard:
        raise doc.error((*path, "soft_usd"), "must not be above hard_usd")
    return BudgetLimit(scope, name, period, soft, hard)


def _models(doc: Document, items: Any) -> tuple[ModelConfig, ...]:
    if not isinstance(items, list):
        raise doc.error(("models",), "must be a list of models")
    seen: set[str] = set()
    out = []
    keys = {"name", "provider", "base_url", "api_key", "upstream_model", "timeouts", "capabilities"}
    for index, item in enumerate(items):
        path = ("models", index)
        item = read_section(doc, path, item, keys)
        name = read_str(doc, (*path, "name"), item.get("name"), required=True)
        if name in seen:
            raise doc.error((*path, "name"), f"model {name!r} is defined twice")
        seen.add(name)
        provider = read_str(doc, (*path, "provider"), item.get("provider", "openai"))
        if provider not in PROVIDERS:
            raise doc.error((*path, "provider"), f"unknown provider {provider!r}; one of {', '.join(sorted(PROVIDERS))}")
        base_url = item.get("base_url") or DEFAULT_BASE_URLS.get(provider)
        base_url = read_str(doc, (*path, "base_url"), base_url, required=True)
        if not base_url.startswith(("http://", "https://")):
            raise doc.error((*path, "base_url"), "must be an http:// or https:// URL")
        api_key = item.get("api_key")
        if api_key is not None:
            api_key = read_str(doc, (*path, "api_key"), api_key) or None
        timeouts = _timeouts(doc, (*path, "timeouts"), item.get("timeouts", {}))
        upstream_model = read_str(doc, (*path, "upstream_model"), item.get("upstream_model", ""))
        capabilities = _capabilities(doc, (*path, "capabilities"), item.get("capabilities", {}))
        out.append(ModelConfig(name, provider, base_url.rstrip("/"), api_key, upstream_model, timeouts, capabilities))
    return tuple(out)


def _capabilities(doc: Document, path: yamlsource.Path, data: Any) -> ModelCapabilities:
    data = read_section(doc, path, data, {"tools", "vision", "json_schema", "context_window"})
    for flag in ("tools", "vision", "json_schema"):
        if flag in data and not isinstance(data[flag], bool):
            raise doc.error((*path, flag), "must be true or false")
    window = data.get("context_window")
    return ModelCapabilities(
        tools=data.get("tools"),
        vision=data.get("vision"),
        json_schema=data.get("json_schema"),
        context_window=None if window is None else read_int(doc, (*path, "context_window"), window, 1),
    )


def _timeouts(doc: Document, path: yamlsource.Path, data: Any) -> Timeouts:
    data = read_section(doc, path, data, {"connect", "first_byte", "total"})
    values = {k: read_seconds(doc, (*path, k), v) for k, v in data.items()}
    return Timeouts(**values)


def _auth(doc: Document, data: Any, env: Mapping[str, str]) -> AuthConfig:
    data = read_section(doc, ("auth",), data, {"master_key", "key_cache_seconds"})
    master = data.get("master_key")
    if master is not None:
        master = read_str(doc, ("auth", "master_key"), master)
    master = master or env.get("THRIFTY_MASTER_KEY") or None
    if master is not None and len(master) < 16:
        raise doc.error(("auth", "master_key"), "must be at least 16 characters")
    ttl = read_seconds(doc, ("auth", "key_cache_seconds"), data.get("key_cache_seconds", AuthConfig.key_cache_seconds))
    return AuthConfig(master_key=master, key_cache_seconds=ttl)


def _server(doc: Document, data: Any) -> ServerConfig:
    keys = {"host", "port", "workers", "max_body_bytes", "drain_timeout", "access_log"}
    data = read_section(doc, ("server",), data, keys)
    base = ServerConfig()
    access_log = data.get("access_log", base.access_log)
    if not isinstance(access_log, bool):
        raise doc.error(("server", "access_log"), "must be true or false")
    return ServerConfig(
        host=read_str(doc, ("server", "host"), data.get("host", base.host)),
        port=read_int(doc, ("server", "port"), data.get("port", base.port), 0, 65535),
        workers=read_int(doc, ("server", "workers"), data.get("workers", base.workers), 1, 256),
        max_body_bytes=read_int(doc, ("server", "max_body_bytes"), data.get("max_body_bytes", base.max_body_bytes), 1024),
        drain_timeout=read_seconds(doc, ("server", "drain_timeout"), data.get("drain_timeout", base.drain_timeout)),
        access_log=access_log,
    )


def read_usd(doc: Document, path: yamlsource.Path, value: Any) -> int:
    """USD as integer nano-dollars."""
    return int(read_money(doc, path, value, "an amount in USD", "a non-negative amount in USD") * NANO_PER_USD)
