"""``thrifty bench savings`` in CI's short mode: a few hundred requests, stand-in models, no sleeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.cli import main

SHIPPED = Path(__file__).parents[1] / "data" / "workload" / "workload.jsonl.gz"


def test_a_malformed_workload_exits_2_naming_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "w.jsonl"
    bad.write_text('{"id": "a"}\n')
    assert main(["bench", "savings", "--workload", str(bad), "--out", str(tmp_path)]) == 2
    assert f"{bad}:1: tenant" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_a_short_replay_reports_consistent_figures(tmp_path: Path) -> None:
    args = ["bench", "savings", "--workload", str(SHIPPED), "--limit", "250", "--latency-scale", "0", "--out", str(tmp_path)]
    assert main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["requests"] == 250
    html = (tmp_path / "report.html").read_text()
    assert html.count("<svg") == 2 and "http" not in html
    for figures in results["passes"].values():
        assert figures["errors"] == 0
        assert figures["baseline_usd"] > figures["actual_usd"] > 0
        assert figures["reduction_pct"] == pytest.approx(100 * (1 - figures["actual_usd"] / figures["baseline_usd"]))
        assert figures["false_hits"] <= figures["cache_hits"]["exact"] + figures["cache_hits"]["semantic"]
    auto = results["passes"]["with the opt-in (route_as: auto)"]
    assert auto["served_locally"] > 0
