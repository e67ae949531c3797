"""Hot reload of the routing policy on a real gateway: the file changed while a stream is in
flight (it finishes on the old version, the next requests name the new one in
x-thrifty-route and the ledger), an invalid file keeps the old policy and says file:line,
SIGHUP with ``thrifty serve --workers 2`` reloads every worker, and a replica that does not
share the file follows a version stored by another one through the database."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from proxy.pipeline.route import Router
from proxy.policy.capabilities import capabilities_for
from proxy.policy.loader import parse_policy
from proxy.policy.reload import PolicyReloader
from proxy.policy.store import PolicyStore
from proxy.settings import ModelConfig, Settings
from proxy.storage.database import open_database
from tests.api.conftest import wait_until
from tests.conftest import MASTER_KEY, UPSTREAM_KEY, settings_for
from tests.fake_upstream import FakeUpstream, reply_text, stream_chunks
from tests.pipeline.test_ledger_e2e import record_of
from tests.servers import ThreadServer
from tests.services import Served, postgres_server, postgres_url  # noqa: F401

V1 = "version: v1\nrules:\n  - name: one\n    match: {model: auto}\n    action: {target: m-aaa}\n"
V2 = "version: v2\nrules:\n  - name: two\n    match: {model: auto}\n    action: {target: m-bbb}\n"
BROKEN = "version: v3\nrules:\n  - name: three\n    match: {model: auto}\n    action: {target: nowhere}\n"


def policy_version(text: str, models: tuple[ModelConfig, ...]) -> str:
    return parse_policy(text, "x", models).version


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(V1, encoding="utf-8")
    return path


@pytest.fixture
def routed(upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path, policy_file: Path) -> Settings:
    base = settings_for(upstream[1].url, tmp_path)
    timeouts = base.models[0].timeouts
    extra = tuple(ModelConfig(n, "openai", f"{upstream[1].url}/v1", UPSTREAM_KEY, timeouts=timeouts) for n in ("m-aaa", "m-bbb"))
    return replace(base, models=(*base.models, *extra), policies=str(policy_file))


@pytest.fixture
def gateway_url(start_gateway: Callable[[Settings], ThreadServer], routed: Settings) -> str:
    return start_gateway(routed).url


@pytest.fixture
def sdk(gateway_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=30) as client:
        yield client


class SlowOnce:
    """Streams the request whose message is "slow" two chunks at a time, then waits for ``release``."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.release = threading.Event()
        fake.handler = self.handle

    async def handle(self, payload: dict[str, Any], request: web.Request) -> web.StreamResponse | None:
        if payload["messages"][-1]["content"] != "slow":
            return None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunks = [b"data: " + orjson.dumps(c) + b"\n\n" for c in stream_chunks(payload, reply_text(payload).split(" "))]
        for chunk in chunks[:2]:
            await response.write(chunk)
        while not self.release.is_set():  # noqa: ASYNC110 (set from the test's thread)
            await asyncio.sleep(0.02)
        for chunk in chunks[2:]:
            await response.write(chunk)
        await response.write(b"data: [DONE]\n\n")
        return response


def route_of(sdk: openai.OpenAI) -> tuple[str, str]:
    raw = sdk.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    return raw.headers.get("x-thrifty-route", ""), raw.headers["x-request-id"]


def test_a_changed_file_swaps_while_a_stream_in_flight_finishes_on_its_version(
    sdk: openai.OpenAI, fake: FakeUpstream, routed: Settings, policy_file: Path
) -> None:
    slow = SlowOnce(fake)
    stream = sdk.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "slow"}], stream=True, stream_options={"include_usage": True}
    )
    assert stream.headers["x-thrifty-route"] == "one"
    chunks = iter(stream.parse())
    next(chunks)  # the stream is flowing on version v1

    policy_file.write_text(V2, encoding="utf-8")
    seen: list[tuple[str, str]] = []
    assert wait_until(lambda: seen.append(route_of(sdk)) or seen[-1][0] == "two", timeout=10), seen

    slow.release.set()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.endswith("slow")
    ledger = Path(routed.ledger.url.removeprefix("sqlite:///"))
    old = record_of(ledger, stream.headers["x-request-id"])
    new = record_of(ledger, seen[-1][1])
    assert (old["route"], old["served_model"], old["policy_version"]) == ("one", "m-aaa", policy_version(V1, routed.models))
    assert (new["route"], new["served_model"], new["policy_version"]) == ("two", "m-bbb", policy_version(V2, routed.models))
    assert old["completion_tokens"] > 0  # the old stream ran to its end


def test_an_invalid_file_keeps_the_old_policy_and_names_the_line(sdk: openai.OpenAI, gateway_url: str, policy_file: Path) -> None:
    policy_file.write_text(BROKEN, encoding="utf-8")
    admin = httpx.Client(base_url=gateway_url, headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30)

    def error() -> str | None:
        found: str | None = admin.get("/v1/thrifty/policy").json()["file_error"]
        return found

    assert wait_until(lambda: error() is not None, timeout=10)
    assert (error() or "").startswith(f"{policy_file}:5: rules[0].action.target: unknown model 'nowhere'"), error()
    assert route_of(sdk)[0] == "one"  # the old policy stays
    assert admin.get("/v1/thrifty/policy").json()["rules"][0]["name"] == "one"

    policy_file.write_text(V2, encoding="utf-8")  # a fixed file is taken, and the error cleared
    assert wait_until(lambda: route_of(sdk)[0] == "two", timeout=10)
    assert error() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals and SO_REUSEPORT")
def test_sighup_reloads_every_worker_of_thrifty_serve(upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path) -> None:
    url = upstream[1].url
    policy = tmp_path / "policy.yaml"
    policy.write_text(V1, encoding="utf-8")
    config = tmp_path / "thrifty.yaml"
    config.write_text(
        "models:\n"
        + "".join(f"  - {{name: {n}, provider: openai, base_url: '{url}/v1', api_key: sk-up}}\n" for n in ("m-aaa", "m-bbb"))
        + f"auth: {{master_key: {MASTER_KEY}}}\n"
        f"ledger: {{url: 'sqlite:///{tmp_path / 'thrifty.db'}', spill_dir: '{tmp_path / 'spill'}'}}\n"
        f"policies: '{policy}'\n"
        "server: {access_log: false}\n",
        encoding="utf-8",
    )
    served = Served(config, "--workers", "2")
    try:
        port = served.port
        served.wait_for("thrifty listening", count=2)

        def routes() -> set[str]:
            seen = set()
            for _ in range(12):  # a new connection each: the kernel spreads them over both workers
                with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {MASTER_KEY}"}) as c:
                    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
                    seen.add(c.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body).headers["x-thrifty-route"])
            return seen

        assert routes() == {"one"}
        # The same size, inode and mtime: the watchers cannot see this change; only SIGHUP can.
        before = os.stat(policy)
        assert len(V1) == len(V2)
        with open(policy, "r+", encoding="utf-8") as f:
            f.write(V2)
        os.utime(policy, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert routes() == {"one"}

        served.process.send_signal(signal.SIGHUP)
        served.wait_for(r"routing policy reloaded \(SIGHUP\): version v1-\w+ -> v2-", count=2, timeout=20)
        assert routes() == {"two"}
        assert served.process.poll() is None  # SIGHUP is not a stop signal

        # An admin write lands on one worker; the other one reloads the file it wrote.
        put = httpx.put(
            f"http://127.0.0.1:{port}/v1/thrifty/policy",
            json={"yaml": V1, "comment": "back to aaa"},
            headers={"Authorization": f"Bearer {MASTER_KEY}"},
            timeout=30,
        )
        assert put.status_code == 200, put.text
        assert wait_until(lambda: routes() == {"one"}, timeout=10)
        served.wait_for(r"routing policy reloaded \(file changed\): version v2-\w+ -> v1-", count=1, timeout=10)
    finally:
        served.terminate()
        assert served.exit_code() == 0


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


async def test_a_replica_without_the_file_follows_the_database(tmp_path: Path, shared_db_url: str) -> None:
    models = (ModelConfig("m-aaa", "openai", "http://127.0.0.1:9/v1"), ModelConfig("m-bbb", "openai", "http://127.0.0.1:9/v1"))
    replicas: list[PolicyReloader] = []
    dbs = []
    try:
        (tmp_path / f".c.yaml.{os.getpid()}.tmp").mkdir()  # c's file cannot be replaced (as on a read-only mount)
        for name in ("a", "b", "c"):  # each replica its own connection and its own copy of the file
            dbs.append(await open_database(shared_db_url))
            path = tmp_path / f"{name}.yaml"
            path.write_text(V1, encoding="utf-8")
            router = Router(parse_policy(V1, str(path), models), capabilities_for(models, {}), [m.name for m in models])
            reloader = PolicyReloader(str(path), models, router, PolicyStore(dbs[-1]), interval=0.05, db_interval=0.1)
            await reloader.start()
            replicas.append(reloader)
        a, b, c = replicas
        stored = await a.publish(V2, a.validate(V2), "create", None, "to bbb")
        assert a.router.policy.rules[0].name == "two"
        for _ in range(100):
            if b.router.policy.rules[0].name == c.router.policy.rules[0].name == "two":
                break
            await asyncio.sleep(0.05)
        assert b.router.policy.rules[0].name == "two" and b.version_id == stored.id
        assert await asyncio.to_thread(Path(b.path).read_text, encoding="utf-8") == V2  # a restart keeps it
        assert c.router.policy.rules[0].name == "two" and c.version_id == stored.id  # runs it all the same
        assert await asyncio.to_thread(Path(c.path).read_text, encoding="utf-8") == V1
        # b's start-up found v1 already the newest (a recorded it): one row for it, not two
        assert [v.action for v in await PolicyStore(dbs[1]).history()] == ["create", "reload-from-file"]
    finally:
        for reloader in replicas:
            await reloader.close()
        for db in dbs:
            await db.close()
