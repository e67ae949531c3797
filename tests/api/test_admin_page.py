"""The admin page (``GET /admin``) in headless Chromium against a real gateway with a policy file.

Chromium is driven over the DevTools protocol (aiohttp's WebSocket client, no extra
dependency): the test signs in through the page's form, edits the YAML, presses the page's
buttons and reads what the page shows, while the gateway behind it is the real one (policy
file, version store, ledger filled by requests sent with the openai SDK). The CSP header and
that the page itself carries no data are checked over plain HTTP. The browser tests skip only
where chromium is not installed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest

from proxy.settings import Settings
from proxy.storage.database import open_database
from proxy.storage.keys import KeyStore
from tests.conftest import MASTER_KEY, settings_for
from tests.fake_upstream import FakeUpstream
from tests.servers import ThreadServer

V1 = (
    "version: v1\n"
    "rules:\n"
    "  - name: cheap\n"
    "    match: {model: auto}\n"
    "    action: {target: gpt-4o-mini}\n"
    "  - name: strong\n"
    "    match: {model: best}\n"
    "    action: {target: gpt-4o, max_tokens: 100}\n"
)
V2 = "version: v2\nrules:\n  - name: everything-mini\n    match: {model: [auto, best]}\n    action: {target: gpt-4o-mini}\n"
BAD_LINE_4 = "version: v9\nrules:\n  - name: bad\n    match: {model: auto, colour: red}\n    action: {target: gpt-4o}\n"

needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")


@dataclass
class Site:
    url: str
    policy_file: Path
    finance_key: str

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=30)


@pytest.fixture
def site(upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path, start_gateway: Callable[[Settings], ThreadServer]) -> Site:
    policy = tmp_path / "policy.yaml"
    policy.write_text(V1, encoding="utf-8")
    settings = replace(settings_for(upstream[1].url, tmp_path), policies=str(policy))

    async def finance_key() -> str:
        db = await open_database(settings.ledger.url)
        try:
            return (await KeyStore(db).create("finance", None, "finance"))[0]
        finally:
            await db.close()

    key = asyncio.run(finance_key())
    return Site(start_gateway(settings).url, policy, key)


# -- a small DevTools-protocol driver -----------------------------------------------------------


class Browser:
    """One headless Chromium tab: evaluate JS, wait for a condition, accept confirm() dialogs."""

    def __init__(self, process: asyncio.subprocess.Process, session: aiohttp.ClientSession):
        self.process, self.session = process, session
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.serial = 0
        self.dialogs: list[str] = []
        # CSP refusals, console errors, uncaught exceptions (not the API's 4xx answers the page shows)
        self.problems: list[str] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    async def connect(self, browser_ws: str) -> None:
        port = re.search(r":(\d+)/", browser_ws)
        assert port is not None
        async with self.session.get(f"http://127.0.0.1:{port.group(1)}/json/list") as response:
            targets = await response.json()
        page = next(t for t in targets if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._spawn(self._read())
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")

    def _spawn(self, job: Any) -> None:
        task = asyncio.ensure_future(job)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _read(self) -> None:
        assert self.ws is not None
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data:
                future = self.pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Page.javascriptDialogOpening":
                self.dialogs.append(params["message"])
                self._spawn(self.send("Page.handleJavaScriptDialog", accept=True))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error" and params["entry"]["source"] != "network":
                self.problems.append(params["entry"]["text"])
            elif method == "Runtime.exceptionThrown":
                self.problems.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
                self.problems.append(str([a.get("value") for a in params["args"]]))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.ws is not None
        self.serial += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[self.serial] = future
        await self.ws.send_str(json.dumps({"id": self.serial, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, 30)
        assert "error" not in reply, reply
        result: dict[str, Any] = reply["result"]
        return result

    async def js(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def wait(self, expression: str, seconds: float = 15) -> Any:
        deadline = time.monotonic() + seconds
        while True:
            value = await self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                shown = await self.js("document.body.innerText")
                raise AssertionError(f"timed out waiting for {expression}; problems {self.problems}; page:\n{shown}")
            await asyncio.sleep(0.05)

    async def open(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    async def sign_in(self, key: str) -> None:
        await self.js(f"document.getElementById('key').value = {json.dumps(key)}")
        await self.js("document.getElementById('signin-button').click()")

    async def edit(self, text: str) -> None:
        await self.js(
            f"(() => {{ const t = document.getElementById('yaml'); t.value = {json.dumps(text)};"
            " t.dispatchEvent(new Event('input')); })()"
        )

    async def click(self, selector: str) -> None:
        await self.js(f"document.querySelector({json.dumps(selector)}).click()")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.ws is not None:
                await self.ws.close()
        await self.session.close()
        for task in list(self.tasks):
            task.cancel()
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    process = await asyncio.create_subprocess_exec(
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--remote-debugging-port=0",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--window-size=1280,1400",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    driver = Browser(process, aiohttp.ClientSession())
    try:
        while True:  # chromium names its DevTools endpoint on stderr
            line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
            assert line, "chromium exited before it listened"
            if line.startswith("DevTools listening on "):
                break
        driver._spawn(process.stderr.read())  # keep draining, or a full pipe stalls chromium
        await driver.connect(line.removeprefix("DevTools listening on ").strip())
        yield driver
    finally:
        await driver.close()


# -- plain HTTP -----------------------------------------------------------------------------


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_page_loads_without_a_key_holds_no_data_and_allows_only_its_own_inline_code(site: Site) -> None:
    response = httpx.get(f"{site.url}/admin", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    for secret in (MASTER_KEY, site.finance_key, "cheap", "strong", "gpt-4o-mini", str(site.policy_file)):
        assert secret not in page  # neither keys nor policy: the data comes only through the APIs, with a key
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, flags=re.DOTALL)
    styles = re.findall(r"<style([^>]*)>(.*?)</style>", page, flags=re.DOTALL)
    assert len(scripts) == 1 and len(styles) == 1 and scripts[0][0] == "" and styles[0][0] == ""
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing loaded from elsewhere

    csp = dict(d.strip().split(" ", 1) for d in response.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'"
    assert csp["script-src"] == _sha256(scripts[0][1]) and csp["style-src"] == _sha256(styles[0][1])
    assert "unsafe" not in response.headers["content-security-policy"]
    assert (csp["form-action"], csp["frame-ancestors"], csp["base-uri"]) == ("'none'", "'none'", "'none'")
    assert response.headers["x-content-type-options"] == "nosniff" and "set-cookie" not in response.headers

    # What the page calls, without a key: nothing.
    for path in ("/v1/thrifty/policy", "/v1/thrifty/policy/versions", "/v1/thrifty/reports?by=route"):
        refused = httpx.get(site.url + path, timeout=30)
        assert refused.status_code == 401 and "cheap" not in refused.text, path


# -- in the browser -------------------------------------------------------------------------

ROWS = "document.querySelectorAll('#{} tbody > tr').length"
CELLS = "[...document.querySelectorAll('#{} tbody > tr')].map(r => [...r.children].map(c => c.innerText.trim()))"


@needs_chromium
async def test_sign_in_edit_save_and_roll_back(site: Site, browser: Browser) -> None:
    await browser.open(f"{site.url}/admin")
    assert await browser.js("document.getElementById('app').hidden") is True

    # An unknown key gets the API's own message; a key without the admin role is told so; neither is kept.
    await browser.sign_in("sk-not-a-key")
    assert await browser.wait("document.getElementById('error').innerText") == "Invalid API key."
    await browser.sign_in(site.finance_key)
    assert await browser.wait("document.getElementById('error').innerText") == "this key is not an admin key"
    assert await browser.js("[sessionStorage.length, document.getElementById('app').hidden]") == [0, True]

    await browser.sign_in(MASTER_KEY)
    await browser.wait(ROWS.format("rules") + " === 2 && " + ROWS.format("version-table") + " === 1")
    rules = await browser.js(CELLS.format("rules"))
    assert [r[:2] for r in rules] == [["cheap", "3"], ["strong", "6"]]
    assert rules[0][2] == "model in ['auto']" and "gpt-4o-mini" in rules[0][3] and "max_tokens: 100" in rules[1][3]
    assert await browser.js("document.getElementById('p-source').innerText") == str(site.policy_file)
    assert await browser.js("document.getElementById('yaml').value") == V1
    # The key is in sessionStorage and nowhere else: not in the DOM, any field, a cookie or the URL.
    seen = await browser.js(
        "[sessionStorage.getItem('thrifty.adminKey'), document.documentElement.outerHTML, document.cookie, location.href,"
        " [...document.querySelectorAll('input, textarea')].map(i => i.value).join('|')]"
    )
    assert seen[0] == MASTER_KEY and all(MASTER_KEY not in part for part in seen[1:]) and seen[2] == ""

    # A bad edit: the file:line error, with the line marked; Save refuses it too.
    await browser.edit(BAD_LINE_4)
    await browser.click("#validate")
    status = await browser.wait("(s => s.includes('colour') && s)(document.getElementById('editor-status').innerText)")
    assert status.startswith(f"Invalid policy: {site.policy_file}:4:")
    assert await browser.js("[...document.querySelectorAll('#gutter .err')].map(n => n.innerText)") == ["4"]
    assert await browser.js("document.getElementById('mark').hidden") is False
    await browser.click("#save")
    await browser.wait("document.getElementById('editor-status').innerText.includes(':4:')")
    assert site.policy_file.read_text(encoding="utf-8") == V1

    # A good edit: valid, then saved with a comment; the versions list grows and shows the diff.
    await browser.edit(V2)
    assert await browser.js("document.querySelectorAll('#gutter .err').length") == 0
    await browser.click("#validate")
    assert (await browser.wait("document.getElementById('editor-status').innerText.startsWith('valid') && 1")) == 1
    await browser.js("document.getElementById('comment').value = 'one rule for all'")
    await browser.click("#save")
    await browser.wait(ROWS.format("version-table") + " === 2")
    assert (await browser.js("document.getElementById('editor-status').innerText")).startswith("saved as version 2")
    versions = await browser.js(CELLS.format("version-table"))
    assert [v[0] for v in versions] == ["2", "1"] and versions[0][3:6] == ["master (admin)", "create", "one rule for all"]
    added = await browser.js("[...document.querySelectorAll('tr[data-id=\"2\"] pre.diff .add')].map(s => s.textContent)")
    removed = await browser.js("[...document.querySelectorAll('tr[data-id=\"2\"] pre.diff .del')].map(s => s.textContent)")
    assert "+  - name: everything-mini" in added and "-  - name: cheap" in removed
    assert await browser.js(CELLS.format("rules") + ".map(r => r[0])") == ["everything-mini"]
    assert site.policy_file.read_text(encoding="utf-8") == V2

    # Rollback to version 1, through the confirm dialog.
    await browser.click("tr[data-id='1'] td:last-child button")
    await browser.wait(ROWS.format("version-table") + " === 3")
    assert len(browser.dialogs) == 1 and browser.dialogs[0].startswith("Roll back to version 1")
    assert (await browser.js("document.getElementById('notice').innerText")).startswith("rolled back to version 1: now version 3")
    assert (await browser.js(CELLS.format("version-table")))[0][4] == "rollback"
    assert await browser.js(CELLS.format("rules") + ".map(r => r[0])") == ["cheap", "strong"]
    assert site.policy_file.read_text(encoding="utf-8") == V1
    with site.sdk() as sdk:
        raw = sdk.chat.completions.with_raw_response.create(model="best", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-thrifty-route"] == "strong"
    assert browser.problems == []  # no CSP refusal, no script error


def _traffic(site: Site) -> list[tuple[str, str, str]]:
    """Requests through the gateway with the SDK; (route, served model, cache result) of each."""
    sent: list[tuple[str, str, dict[str, str]]] = [("auto", "q1", {}), ("auto", "q1", {}), ("auto", "q2", {})]
    sent += [("best", "q1", {}), ("fast", "q3", {}), ("fast", "q4", {"Cache-Control": "no-store"})]
    seen = []
    with site.sdk() as sdk:
        for model, text, headers in sent:
            raw = sdk.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": text}], temperature=0, extra_headers=headers
            )
            got = raw.headers
            seen.append((got.get("x-thrifty-route", "(no rule)"), got["x-thrifty-model"], got["x-thrifty-cache"]))
            time.sleep(0.1)  # the cache stores after answering: let the repeat find it
    return seen


@needs_chromium
async def test_charts_draw_one_bar_per_route_model_and_cache_result(site: Site, browser: Browser) -> None:
    seen = await asyncio.to_thread(_traffic, site)
    routes, models, caches = (Counter(s[i] for s in seen) for i in range(3))
    # (the repeat is an exact hit unless the store lagged: the charts are checked against what happened)
    assert len(routes) == 3 and len(models) == 3 and {"miss", "bypass"} <= set(caches)

    def recorded() -> bool:  # the ledger writes in batches
        report = httpx.get(
            f"{site.url}/v1/thrifty/reports",
            params={"by": "route", "since": "2026-01-01"},
            headers={"Authorization": f"Bearer {MASTER_KEY}"},
            timeout=30,
        )
        return bool(report.json()["totals"]["requests"] == len(seen))

    deadline = time.monotonic() + 15
    while not await asyncio.to_thread(recorded):
        assert time.monotonic() < deadline, "the ledger did not record the requests"
        await asyncio.sleep(0.1)

    await browser.open(f"{site.url}/admin")
    await browser.sign_in(MASTER_KEY)
    await browser.wait("document.querySelectorAll('#chart-list figure svg').length === 5")
    charts = await browser.js(
        "Object.fromEntries([...document.querySelectorAll('#chart-list figure')].map(f => [f.dataset.chart,"
        " [...f.querySelectorAll('rect.bar')].map(r => [r.previousSibling.textContent, r.nextSibling.textContent,"
        " Number(r.getAttribute('width'))])]))"
    )
    for name, counts in (("route-share", routes), ("model-share", models), ("cache", caches)):
        bars = charts[name]
        assert len(bars) == len(counts), (name, bars)
        assert {label: text.split("(")[1] for label, text, _ in bars} == {k: f"{n})" for k, n in counts.items()}
        widest = max(w for _, _, w in bars)
        for label, _, width in bars:  # bar lengths in proportion to the requests
            assert width == pytest.approx(widest * counts[label] / max(counts.values()), abs=0.01)
    assert {b[0] for b in charts["route-cost"]} == set(routes) and {b[0] for b in charts["model-cost"]} == set(models)
    assert all(text.startswith("$") for _, text, _ in charts["model-cost"])
    assert browser.problems == []
