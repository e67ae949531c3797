"""The savings workload format: the shipped file parses, and a bad line is named by FILE:LINE."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.bench.standin import Plan, answer_for, read_tag, tag_of
from proxy.bench.workload import read_workload, root_of
from proxy.errors import ConfigError

SHIPPED = Path(__file__).parents[1] / "data" / "workload" / "workload.jsonl.gz"
GOOD = '{"id": "a", "tenant": "t", "request": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, "x": 1}'


def test_the_shipped_workload_parses_with_its_labels() -> None:
    items = read_workload(SHIPPED)
    assert len(items) >= 2000
    assert len({i.tenant for i in items}) == 6
    by_id = {i.id: i for i in items}
    assert sum(i.duplicate_of is not None for i in items) >= 500
    assert all(root_of(i, by_id) != i.id for i in items if i.duplicate_of)
    assert {i.difficulty for i in items} == {"simple", "hard", None}
    assert sum(i.reference is not None for i in items) >= 500
    assert any("tools" in i.request for i in items)
    assert max(len(i.request["messages"]) for i in items) >= 21


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ("not json", "not JSON"),
        ('{"id": "b", "tenant": "t"}', "request"),
        ('{"id": "b", "tenant": "t", "request": {"model": "m", "messages": []}}', "request.messages"),
        (GOOD.replace('"x": 1', '"labels": {"difficulty": "medium"}').replace('"a"', '"b"'), "labels.difficulty"),
        (GOOD.replace('"x": 1', '"labels": {"duplicate_of": "zz"}').replace('"a"', '"b"'), "duplicate_of 'zz'"),
        (GOOD, "appears twice"),
    ],
)
def test_a_malformed_line_is_reported_with_its_line_number(tmp_path: Path, line: str, what: str) -> None:
    path = tmp_path / "w.jsonl"
    path.write_text(GOOD + "\n\n" + line + "\n")
    with pytest.raises(ConfigError) as caught:
        read_workload(path)
    assert str(caught.value).startswith(f"{path}:3: ")
    assert what in str(caught.value)


def test_unknown_fields_are_ignored_and_limit_stops_early(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_text(GOOD + "\n" + GOOD.replace('"a"', '"b"') + "\nbroken\n")
    assert [i.id for i in read_workload(path, limit=2)] == ["a", "b"]


def test_a_stand_in_answer_carries_its_reference_and_the_tag_of_its_question() -> None:
    answer = answer_for("What is 2+2?", Plan(words=5, reference="4"), large=True)
    text, tag = read_tag(answer)
    assert tag == tag_of("What is 2+2?") and text.endswith("\n\n4")
    assert "4" not in read_tag(answer_for("What is 2+2?", Plan(words=5, reference="4"), large=False))[0].split()
