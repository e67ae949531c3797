"""The policy admin API through a real gateway: admin keys only (the master key is one),
PUT valid and invalid policies (400 naming the line), the audit trail with author, comment
and diff, rollback, the dry-run validate, and that a write really routes the next request
and lands in the policy file."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import openai
import pytest

from proxy.settings import ModelConfig, Settings
from proxy.storage.database import open_database
from proxy.storage.keys import KeyStore
from tests.api.conftest import error_of
from tests.conftest import MASTER_KEY, UPSTREAM_KEY, settings_for
from tests.fake_upstream import FakeUpstream
from tests.servers import ThreadServer

PATH = "/v1/thrifty/policy"
V1 = "version: v1\nrules:\n  - name: one\n    match: {model: auto}\n    action: {target: m-aaa}\n"
V2 = "version: v2\nrules:\n  - name: two\n    match: {model: auto}\n    action: {target: m-bbb, max_tokens: 50}\n"
BAD_LINE_4 = "version: v9\nrules:\n  - name: bad\n    match: {model: auto, colour: red}\n    action: {target: m-aaa}\n"


@dataclass
class Admin:
    url: str
    keys: dict[str, str]
    policy_file: Path

    def call(
        self, method: str, path: str = "", key: str | None = None, headers: dict[str, str] | None = None, **kwargs: object
    ) -> httpx.Response:
        sent = {"Authorization": f"Bearer {key or MASTER_KEY}", **(headers or {})}
        return httpx.request(method, f"{self.url}{PATH}{path}", headers=sent, timeout=30, **kwargs)  # type: ignore[arg-type]

    def route(self) -> str:
        with openai.OpenAI(base_url=f"{self.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=30) as sdk:
            raw = sdk.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": "hi"}])
            return raw.headers.get("x-thrifty-route", "")


@pytest.fixture
def admin(
    upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path, start_gateway: Callable[[Settings], ThreadServer]
) -> Iterator[Admin]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(V1, encoding="utf-8")
    base = settings_for(upstream[1].url, tmp_path)
    extra = tuple(
        ModelConfig(n, "openai", f"{upstream[1].url}/v1", UPSTREAM_KEY, timeouts=base.models[0].timeouts)
        for n in ("m-aaa", "m-bbb")
    )
    settings = replace(base, models=(*base.models, *extra), policies=str(policy))

    async def make_keys() -> dict[str, str]:
        db = await open_database(settings.ledger.url)
        try:
            store = KeyStore(db)
            return {role: (await store.create("ops", None, role))[0] for role in ("user", "finance", "admin")}
        finally:
            await db.close()

    keys = asyncio.run(make_keys())
    yield Admin(start_gateway(settings).url, keys, policy)


def test_only_admin_keys_may_read_or_change_the_policy(admin: Admin) -> None:
    for role in ("user", "finance"):
        for method, path, body in (("GET", "", None), ("PUT", "", V2), ("GET", "/versions", None), ("POST", "/rollback", "{}")):
            response = admin.call(method, path, admin.keys[role], content=body)
            assert response.status_code == 403, (role, method, path, response.text)
            assert error_of(response)["code"] == "permission_denied"
    assert admin.call("GET", key="sk-nope").status_code == 401
    assert admin.route() == "one"  # nothing changed
    assert admin.call("GET", key=admin.keys["admin"]).status_code == 200


def test_get_shows_the_active_version_its_yaml_and_rules(admin: Admin) -> None:
    body = admin.call("GET").json()
    assert body["version"].startswith("v1-") and body["yaml"] == V1 and body["id"] == 1 and body["file_error"] is None
    assert body["rules"] == [
        {
            "name": "one",
            "line": 3,
            "match": ["model in ['auto']"],
            "targets": [{"label": "m-aaa", "weight": 1, "models": ["m-aaa"]}],
            "strategy": "ordered",
            "cascade": None,
            "cache": None,
            "max_tokens": None,
            "inactive": None,
        }
    ]


def test_put_stores_writes_the_file_and_routes_the_next_request(admin: Admin) -> None:
    response = admin.call("PUT", key=admin.keys["admin"], json={"yaml": V2, "comment": "cheaper model"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["id"], body["parent_id"], body["action"], body["comment"]) == (2, 1, "create", "cheaper model")
    assert body["version"].startswith("v2-") and body["rules"][0]["name"] == "two"
    assert admin.route() == "two"  # this worker swapped at once
    assert admin.policy_file.read_text(encoding="utf-8") == V2

    # A plain YAML body works too (comment from a header).
    plain = admin.call("PUT", content=V1.encode(), headers={"Content-Type": "application/yaml", "x-thrifty-comment": "back"})
    assert plain.status_code == 200, plain.text
    assert plain.json()["comment"] == "back" and admin.route() == "one"


def test_an_invalid_put_is_refused_with_the_line_and_nothing_changes(admin: Admin) -> None:
    response = admin.call("PUT", json={"yaml": BAD_LINE_4})
    assert response.status_code == 400
    error = error_of(response)
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_policy", "yaml")
    assert f"{admin.policy_file}:4:" in error["message"] and "colour" in error["message"], error["message"]
    yaml_error = admin.call("PUT", json={"yaml": "rules: [\n  - name: x\n    action: {target: m-aaa\n"})
    assert yaml_error.status_code == 400 and f"{admin.policy_file}:" in error_of(yaml_error)["message"]
    assert admin.call("PUT", content=b'{"comment": 1}', headers={"Content-Type": "application/json"}).status_code == 400
    assert admin.policy_file.read_text(encoding="utf-8") == V1 and admin.route() == "one"
    assert [v["id"] for v in admin.call("GET", "/versions").json()["data"]] == [1]


def test_validate_is_a_dry_run(admin: Admin) -> None:
    ok = admin.call("POST", "/validate", json={"yaml": V2})
    assert ok.status_code == 200 and ok.json()["valid"] is True and ok.json()["rules"][0]["name"] == "two"
    bad = admin.call("POST", "/validate", json={"yaml": BAD_LINE_4})
    assert bad.status_code == 400 and ":4:" in error_of(bad)["message"]
    assert admin.route() == "one" and len(admin.call("GET", "/versions").json()["data"]) == 1


def test_versions_list_who_when_why_and_the_diff_and_rollback_restores(admin: Admin) -> None:
    assert admin.call("PUT", key=admin.keys["admin"], json={"yaml": V2, "comment": "to bbb"}).status_code == 200
    versions = admin.call("GET", "/versions").json()["data"]
    assert [(v["id"], v["action"]) for v in versions] == [(2, "create"), (1, "reload-from-file")]
    newest = versions[0]
    assert newest["author_role"] == "admin" and newest["author_key_id"] not in (None, "master")
    assert newest["comment"] == "to bbb" and newest["created_at"] > 0 and "yaml" not in newest
    diff = newest["diff"].splitlines()
    assert diff[0].startswith("--- v1 (v1-") and diff[1].startswith("+++ v2 (v2-")
    assert "-    action: {target: m-aaa}" in diff and "+    action: {target: m-bbb, max_tokens: 50}" in diff
    assert admin.call("GET", "/versions/1").json()["yaml"] == V1

    back = admin.call("POST", "/rollback", json={"version": 1})
    assert back.status_code == 200, back.text
    body = back.json()
    assert (body["id"], body["action"], body["author_key_id"], body["comment"]) == (
        3,
        "rollback",
        "master",
        "rollback to version 1",
    )
    assert admin.route() == "one" and admin.policy_file.read_text(encoding="utf-8") == V1
    assert admin.call("GET").json()["yaml"] == V1
    # by label too; unknown versions and bad bodies are refused
    label = admin.call("GET", "/versions/2").json()["version"]
    assert admin.call("POST", "/rollback", json={"version": label, "comment": "again"}).json()["comment"] == "again"
    assert admin.route() == "two"
    assert error_of(admin.call("POST", "/rollback", json={"version": 99}))["code"] == "not_found"
    assert admin.call("POST", "/rollback", json={"nope": 1}).status_code == 400
    assert admin.call("GET", "/versions", params={"limit": "0"}).status_code == 400
    assert [v["id"] for v in admin.call("GET", "/versions", params={"limit": "2", "before": "4"}).json()["data"]] == [3, 2]


def test_without_a_policy_file_the_admin_api_says_routing_is_off(raw: httpx.Client) -> None:
    for method in ("GET", "PUT"):
        response = raw.request(method, PATH, content=V1)
        assert response.status_code == 400
        assert error_of(response)["code"] == "routing_disabled"
