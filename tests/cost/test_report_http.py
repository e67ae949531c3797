"""``GET /v1/thrifty/reports`` through a real gateway: finance and admin keys only, three formats.

Keys are made with the key store and records written with the ledger writer's INSERT, on
the very SQLite file the gateway then opens.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from proxy.cost.record import LedgerRecord
from proxy.settings import Settings
from proxy.storage.database import open_database
from proxy.storage.keys import KeyStore
from tests.conftest import MASTER_KEY, settings_for
from tests.cost import insert, record, sample
from tests.fake_upstream import FakeUpstream
from tests.servers import ThreadServer

PATH = "/v1/thrifty/reports"
DAYS = ["2026-11-02", "2026-11-09", "2026-11-10", "2026-11-27"]


class Gateway:
    def __init__(self, server: ThreadServer, keys: dict[str, str], records: list[LedgerRecord]):
        self.server, self.keys, self.records = server, keys, records

    def get(self, key: str | None, **params: str | list[str]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(self.server.url + PATH, params=params, headers=headers, timeout=30)


@pytest.fixture
def gateway(
    upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path, start_gateway: Callable[[Settings], ThreadServer]
) -> Iterator[Gateway]:
    settings = settings_for(upstream[1].url, tmp_path)
    records = [*sample(21, 300, DAYS), record("2026-12-01T00:00:00", team="december")]

    async def prepare() -> dict[str, str]:
        db = await open_database(settings.ledger.url)
        try:
            store = KeyStore(db)
            keys = {role: (await store.create("finance", None, role))[0] for role in ("user", "finance", "admin")}
            revoked, made = await store.create("finance", None, "finance")
            await store.revoke(made.id)
            keys["revoked"] = revoked
            await insert(db, records)
            return keys
        finally:
            await db.close()

    keys = asyncio.run(prepare())
    yield Gateway(start_gateway(settings), keys, records[:-1])


def assert_error(response: httpx.Response, status: int, code: str | None, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param)
    assert "Traceback" not in error["message"]
    return str(error["message"])


def test_a_finance_key_gets_json_by_default(gateway: Gateway) -> None:
    response = gateway.get(gateway.keys["finance"], period="2026-11", by="team,model")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store" and response.headers["x-request-id"]
    doc = response.json()
    assert doc["query"]["by"] == ["team", "model"] and doc["query"]["period"] == "2026-11"
    assert doc["totals"]["requests"] == len(gateway.records)
    assert doc["totals"]["cost_nusd"] == sum(r.cost_nusd for r in gateway.records) == sum(r["cost_nusd"] for r in doc["rows"])
    assert "december" not in {r["team"] for r in doc["rows"]}


@pytest.mark.parametrize("who", ["admin", "master"])
def test_admin_keys_may_read_reports(gateway: Gateway, who: str) -> None:
    key = MASTER_KEY if who == "master" else gateway.keys["admin"]
    response = gateway.get(key, since="2026-11-09", until="2026-11-11", by="day")
    assert response.status_code == 200, response.text
    assert [r["day"] for r in response.json()["rows"]] == ["2026-11-09", "2026-11-10"]


def test_a_user_key_is_refused(gateway: Gateway) -> None:
    message = assert_error(gateway.get(gateway.keys["user"], period="2026-11"), 403, "permission_denied")
    assert "role (user)" in message


@pytest.mark.parametrize("key", [None, "sk-thr-not-a-key", "revoked"])
def test_no_key_or_a_bad_one_is_401(gateway: Gateway, key: str | None) -> None:
    assert_error(gateway.get(gateway.keys.get(key or "", key)), 401, "invalid_api_key")


def test_csv_is_an_attachment_that_parses_back(gateway: Gateway) -> None:
    response = gateway.get(gateway.keys["finance"], period="2026-11", by="team", format="csv")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == 'attachment; filename="thrifty-report-2026-11.csv"'
    rows = list(csv.DictReader(io.StringIO(response.content.decode("utf-8-sig"), newline="")))
    total, data = rows[-1], rows[:-1]
    assert total["team"] == "TOTAL"
    for column in ("cost_usd", "baseline_usd", "net_savings_usd"):
        assert sum(Decimal(r[column]) for r in data) == Decimal(total[column])
    assert int(total["requests"]) == len(gateway.records)


def test_html_is_a_self_contained_page(gateway: Gateway) -> None:
    response = gateway.get(gateway.keys["finance"], period="2026-11", by="team", format="html")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page = response.text
    assert page.count("<svg") == 3 and "<script" not in page and "https://" not in page and "http://" not in page


def test_repeated_by_parameters_group_together(gateway: Gateway) -> None:
    response = gateway.get(gateway.keys["finance"], period="2026-11", by=["team", "cache"])
    assert response.status_code == 200 and response.json()["query"]["by"] == ["team", "cache"]


@pytest.mark.parametrize(
    ("params", "param", "text"),
    [
        ({"by": "team,colour"}, "by", "by: unknown grouping key 'colour'"),
        ({"since": "yesterday"}, "since", "since: 'yesterday' is not a date"),
        ({"since": "2026-11-05", "until": "2026-11-01"}, "since", "must be before until"),
        ({"period": "2026-11", "since": "2026-11-01"}, "period", "period cannot be combined with since or until"),
        ({"until": "2026-11-05"}, "until", "until needs since"),
        ({"period": "2026-13"}, "period", "period: '2026-13' is not a period"),
        ({"format": "xml"}, "format", "format must be one of table, csv, json, html, not 'xml'."),
        ({"peroid": "2026-11"}, "peroid", "Unknown parameter 'peroid'"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(gateway: Gateway, params: dict[str, str], param: str, text: str) -> None:
    message = assert_error(gateway.get(gateway.keys["finance"], **params), 400, None, param)
    assert text in message


def test_reports_are_read_only(gateway: Gateway) -> None:
    response = httpx.post(gateway.server.url + PATH, headers={"Authorization": f"Bearer {gateway.keys['finance']}"})
    assert_error(response, 405, "method_not_allowed")
