"""The policy admin API, for admin keys (the master key counts as admin).

- ``GET /v1/thrifty/policy``: the active version, its YAML and a summary of its rules;
- ``PUT /v1/thrifty/policy``: a YAML body, or JSON ``{"yaml": ..., "comment": ...}``;
  validated by the loader the file goes through, then stored as a new version, written to
  the policy file (atomically) and swapped in (``proxy.policy.reload``);
- ``POST /v1/thrifty/policy/validate``: the same check as PUT, changing nothing;
- ``GET /v1/thrifty/policy/versions`` (``?limit=&before=``) and ``.../versions/{id}``:
  the audit trail, newest first: who, when, comment, diff;
- ``POST /v1/thrifty/policy/rollback`` ``{"version": id or label, "comment": ...}``: a new
  version whose text is the old one's.

Errors are OpenAI-shaped (raised here, mapped by the error middleware): 403 for other
roles, 400 with ``file:line: what is wrong`` for an invalid policy.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from proxy.api.middleware import REQUEST_ID
from proxy.app_state import GATEWAY, Gateway
from proxy.errors import BadRequest, ConfigError, NotFound
from proxy.pipeline.auth import Principal, bearer_token
from proxy.policy.model import Policy, Rule
from proxy.policy.reload import PolicyReloader

PATH = "/v1/thrifty/policy"
_MAX_LIMIT = 500


async def _admin(request: web.Request) -> tuple[Gateway, Principal]:
    gateway = request.app[GATEWAY]
    token = bearer_token(request.headers.get("Authorization"), request.headers.get("x-api-key"))
    principal = await gateway.auth.authenticate(token)
    principal.require("admin")
    return gateway, principal


def _reloader(gateway: Gateway) -> PolicyReloader:
    if gateway.reloader is None:
        raise BadRequest(
            "Routing is off on this gateway: no policy file is configured (policies: in the configuration).",
            code="routing_disabled",
        )
    return gateway.reloader


def _json(request: web.Request, data: Any, status: int = 200) -> web.Response:
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store", "x-request-id": request[REQUEST_ID]}
    return web.Response(status=status, body=orjson.dumps(data), headers=headers)


def rule_summary(rule: Rule) -> dict[str, Any]:
    action = rule.action
    cascade = action.cascade
    return {
        "name": rule.name,
        "line": rule.line,
        "match": [c.text for c in rule.conditions],
        "targets": [{"label": arm.label, "weight": arm.weight, "models": list(arm.models)} for arm in action.arms],
        "strategy": action.strategy,
        "cascade": None if cascade is None else {"then": list(cascade.then), "checks": list(cascade.checks)},
        "cache": None if action.cache is None else action.cache.mode,
        "max_tokens": action.max_tokens,
        "inactive": action.inactive,
    }


def policy_summary(policy: Policy) -> dict[str, Any]:
    return {
        "version": policy.version,
        "source": policy.source,
        "rules": [rule_summary(r) for r in policy.rules],
        "aliases": {name: list(models) for name, models in policy.aliases.items()},
    }


async def get_policy(request: web.Request) -> web.Response:
    gateway, _ = await _admin(request)
    reloader = _reloader(gateway)
    policy = reloader.router.policy
    body = {**policy_summary(policy), "id": reloader.version_id, "yaml": reloader.text, "file_error": reloader.file_error}
    return _json(request, body)


async def _submitted(request: web.Request) -> tuple[str, str | None]:
    """The YAML and comment from a PUT/validate body: JSON {yaml, comment} or the YAML itself."""
    raw = await request.read()
    if request.content_type == "application/json":
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"The body is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("yaml"), str):
            raise BadRequest('A JSON body is {"yaml": "<policy text>", "comment": "<why>"}.', param="yaml")
        comment = data.get("comment")
        if comment is not None and not isinstance(comment, str):
            raise BadRequest("comment must be a string.", param="comment")
        return data["yaml"], comment
    try:
        return raw.decode("utf-8"), request.headers.get("x-thrifty-comment")
    except UnicodeDecodeError:
        raise BadRequest("The policy must be UTF-8 text.") from None


async def _validated(reloader: PolicyReloader, text: str) -> Policy:
    try:
        return await asyncio.to_thread(reloader.validate, text)
    except ConfigError as exc:
        raise BadRequest(f"Invalid policy: {exc}", param="yaml", code="invalid_policy") from None


async def put_policy(request: web.Request) -> web.Response:
    gateway, principal = await _admin(request)
    reloader = _reloader(gateway)
    text, comment = await _submitted(request)
    policy = await _validated(reloader, text)
    stored = await reloader.publish(text, policy, "create", principal, comment)
    return _json(request, {**policy_summary(policy), **stored.as_json(with_yaml=False)})


async def validate_policy(request: web.Request) -> web.Response:
    gateway, _ = await _admin(request)
    reloader = _reloader(gateway)
    text, _comment = await _submitted(request)
    policy = await _validated(reloader, text)
    return _json(request, {"valid": True, **policy_summary(policy)})


def _int_param(request: web.Request, name: str, default: int | None, low: int, high: int) -> int | None:
    value = request.query.get(name)
    if value is None:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}, not {value!r}.", param=name)
    return int(value)


async def list_versions(request: web.Request) -> web.Response:
    gateway, _ = await _admin(request)
    store = _reloader(gateway).store
    assert store is not None
    limit = _int_param(request, "limit", 50, 1, _MAX_LIMIT) or 50
    before = _int_param(request, "before", None, 1, 2**62)
    versions = await store.history(limit, before)
    data = [v.as_json(with_yaml=False) for v in versions]
    return _json(request, {"object": "list", "data": data, "has_more": len(data) == limit})


async def get_version(request: web.Request) -> web.Response:
    gateway, _ = await _admin(request)
    store = _reloader(gateway).store
    assert store is not None
    found = await store.find(request.match_info["ref"])
    if found is None:
        raise NotFound(f"No policy version {request.match_info['ref']!r}.", param="version")
    return _json(request, found.as_json())


async def rollback(request: web.Request) -> web.Response:
    gateway, principal = await _admin(request)
    reloader = _reloader(gateway)
    assert reloader.store is not None
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        data = None
    ref = data.get("version") if isinstance(data, dict) else None
    if not isinstance(ref, str | int) or isinstance(ref, bool) or str(ref) == "":
        raise BadRequest('The body is {"version": <id or label>, "comment": "<why>"}.', param="version")
    old = await reloader.store.find(ref)
    if old is None:
        raise NotFound(f"No policy version {ref!r}.", param="version")
    policy = await _validated(reloader, old.yaml)  # the models may have changed since
    comment = data.get("comment") if isinstance(data.get("comment"), str) else None
    stored = await reloader.publish(old.yaml, policy, "rollback", principal, comment or f"rollback to version {old.id}")
    return _json(request, {**policy_summary(policy), **stored.as_json(with_yaml=False)})


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get(PATH, get_policy)
    app.router.add_put(PATH, put_policy)
    app.router.add_post(f"{PATH}/validate", validate_policy)
    app.router.add_get(f"{PATH}/versions", list_versions)
    app.router.add_get(f"{PATH}/versions/{{ref}}", get_version)
    app.router.add_post(f"{PATH}/rollback", rollback)
