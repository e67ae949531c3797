"""Semantic cache precision: how many duplicates a threshold serves, and how many near-misses it
serves a wrong answer, on the labelled pairs in tests/data/cache_pairs/.

Run on purpose, from the repository root (about 10 s on 2 cores):

    .venv/bin/python -m tests.benchmarks.cache_precision [--write-results] [--limit N]

Each pair is treated as thrifty treats it: pair ``a`` is a stored single-turn (or multi-turn)
request, ``b`` a new one, both ``temperature: 0`` chat completions of one tenant and route.
The embedded text and the partition come from ``proxy.cache.semantic_key`` (the last user
message is embedded; the earlier turns as content words, the parameters and the tenant make
the partition), the vectors from thrifty's in-process embedder (all-MiniLM-L6-v2 int8), and a
candidate is served when it is in the same partition and ``semantic_key.decide`` serves it:
the guard (numbers, negations, word order) and either the threshold (cosine tier) or the same
content words from ``WORDS_FLOOR`` (words tier). Three modes are reported for each threshold:
**cosine only** (what a plain similarity cache does: the last message alone, no partition, no
guard), **cosine tier** (partition + guard + cosine: thrifty before the words tier) and
**thrifty** (both tiers).
*Hit rate*: share of duplicates served; *false-hit rate*: share of non-duplicates served
(a wrong answer). ``--write-results`` writes the tables to tests/data/cache_pairs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import difflib
import gzip
import json
import math
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from proxy.cache import semantic_key
from proxy.cache.embedder import LocalEmbedder

DATA = Path(__file__).resolve().parents[1] / "data" / "cache_pairs"
PAIRS = DATA / "pairs.jsonl.gz"
RESULTS = DATA / "RESULTS.md"
THRESHOLDS = (0.80, 0.85, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.993, 0.995, 0.997, 0.999)
MAX_FALSE_HITS = 0.01
TENANT, ROUTE = "team:study", "study"
NOTES = "<!-- notes: kept by --write-results -->"


def load_pairs(path: Path = PAIRS, kind: str | None = None) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def request(side: str | list[dict[str, str]]) -> dict[str, Any]:
    """The chat completion a client would send for one side of a pair."""
    messages = [{"role": "user", "content": side}] if isinstance(side, str) else side
    return {"model": "gpt-4o", "messages": messages, "temperature": 0}


@dataclass(frozen=True, slots=True)
class Scored:
    """One pair as the cache sees it."""

    id: str
    kind: str
    category: str
    duplicate: bool
    similarity: float  # cosine of the embedded texts
    same_partition: bool
    compatible: bool  # the guard's verdict
    same_words: bool  # the words tier's verdict (without its cosine floor)
    texts: tuple[str, str]  # embedded: stored, asked

    def served(self, threshold: float, plain: bool = False, words: bool = True) -> bool:
        """As ``semantic_key.decide`` would, within one partition (``plain``: cosine alone; ``words``: that tier on)."""
        if plain:
            return self.similarity >= threshold
        if not (self.same_partition and self.compatible):
            return False
        return self.similarity >= threshold or (words and self.same_words and self.similarity >= semantic_key.WORDS_FLOOR)


def score(rows: Sequence[dict[str, Any]], embedder: LocalEmbedder) -> list[Scored]:
    keys = []
    for r in rows:
        a = semantic_key.semantic_key(request(r["a"]), TENANT, ROUTE, embedder.name)
        b = semantic_key.semantic_key(request(r["b"]), TENANT, ROUTE, embedder.name)
        if a is None or b is None:
            raise ValueError(f"pair {r['id']}: not semantically cacheable")
        keys.append((a, b))
    unique = sorted({k.text for pair in keys for k in pair})  # a text shared by pairs is embedded once
    vectors = dict(zip(unique, embedder.embed_sync(unique), strict=True))
    similarity = [float(vectors[a.text] @ vectors[b.text]) for a, b in keys]
    return [
        Scored(
            r["id"],
            r["kind"],
            r["category"],
            bool(r["duplicate"]),
            float(s),
            a.partition == b.partition,
            semantic_key.compatible(b.text, a.text),
            semantic_key.same_words(b.text, a.text),
            (a.text, b.text),
        )
        for r, (a, b), s in zip(rows, keys, similarity, strict=True)
    ]


@dataclass(frozen=True, slots=True)
class Rates:
    threshold: float
    duplicates: int
    served: int  # duplicates served
    negatives: int
    wrong: int  # non-duplicates served

    @property
    def hit_rate(self) -> float:
        return self.served / self.duplicates if self.duplicates else 0.0

    @property
    def false_hit_rate(self) -> float:
        return self.wrong / self.negatives if self.negatives else 0.0

    @property
    def false_hit_upper(self) -> float:
        """One-sided 95% Clopper-Pearson upper bound of the false-hit rate."""
        return binomial_upper(self.wrong, self.negatives)


def rates(scores: Iterable[Scored], threshold: float, plain: bool = False, words: bool = True) -> Rates:
    pairs = list(scores)
    duplicates = [s for s in pairs if s.duplicate]
    negatives = [s for s in pairs if not s.duplicate]
    served = sum(s.served(threshold, plain, words) for s in duplicates)
    wrong = sum(s.served(threshold, plain, words) for s in negatives)
    return Rates(threshold, len(duplicates), served, len(negatives), wrong)


def binomial_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """The p at which seeing at most ``k`` of ``n`` has probability 1 - confidence (bisection)."""
    if n == 0:
        return 1.0
    alpha = 1.0 - confidence
    low, high = k / n, 1.0
    for _ in range(60):
        p = (low + high) / 2
        below = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        low, high = (p, high) if below > alpha else (low, p)
    return high


def least_threshold(scores: Sequence[Scored], bound: bool, limit: float = MAX_FALSE_HITS) -> float | None:
    """The lowest threshold (0.001 steps) whose false-hit rate, or its 95% upper bound, is at most ``limit``."""
    for step in range(800, 1001):
        r = rates(scores, step / 1000)
        if (r.false_hit_upper if bound else r.false_hit_rate) <= limit:
            return step / 1000
    return None


def sweep_table(scores: Sequence[Scored], thresholds: Sequence[float], shipped: float) -> str:
    head = (
        "| threshold | cosine only: hit rate | false-hit rate | cosine tier: hit rate | false hits |"
        " thrifty (both tiers): hit rate | false-hit rate | false hits (95% bound) |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for t in sorted({*thresholds, shipped}):
        plain, tier, ours = rates(scores, t, plain=True), rates(scores, t, words=False), rates(scores, t)
        mark = " (default)" if t == shipped else ""
        lines.append(
            f"| {t:.3f}{mark} | {plain.hit_rate:.1%} | {plain.false_hit_rate:.1%} | {tier.hit_rate:.1%} | {tier.wrong} |"
            f" {ours.hit_rate:.1%} | {ours.false_hit_rate:.1%} |"
            f" {ours.wrong} of {ours.negatives} (≤ {ours.false_hit_upper:.1%}) |"
        )
    return "\n".join(lines)


def category_table(scores: Sequence[Scored], threshold: float) -> str:
    lines = ["| category | pairs | duplicate | served (thrifty) | served (cosine only) |", "|---|---|---|---|---|"]
    for category in sorted({s.category for s in scores}, key=lambda c: (not _is_dup(scores, c), c)):
        mine = [s for s in scores if s.category == category]
        ours = sum(s.served(threshold) for s in mine) / len(mine)
        plain = sum(s.served(threshold, plain=True) for s in mine) / len(mine)
        lines.append(f"| {category} | {len(mine)} | {'yes' if mine[0].duplicate else 'no'} | {ours:.1%} | {plain:.1%} |")
    return "\n".join(lines)


def _is_dup(scores: Sequence[Scored], category: str) -> bool:
    return next(s.duplicate for s in scores if s.category == category)


# The words tier's variants, measured alone (partition and guard kept, no cosine tier): what each
# step of the normalization adds. The first is E2's candidate (before the words tier shipped).
_E2_FILLER_WORDS = (
    "a an the i me my we our you your it its is are am be do does did can could would should will to of in on at for with"
    " and or so uh um hi hello hiya hey there please thanks thank advance just what whats how where when which who why"
    " i'm im there's"
)
_E2_FILLER = frozenset(_E2_FILLER_WORDS.split())
_E2_WORD = re.compile(r"[a-z0-9£$€%']+")


def e2_words(text: str) -> list[str]:
    return [w for w in _E2_WORD.findall(text.lower().replace("’", "'")) if w not in _E2_FILLER]


def _normalized(stored: str, asked: str) -> bool:
    return semantic_key.content_words(stored) == semantic_key.content_words(asked)


def _fronted(stored: str, asked: str) -> bool:
    cw = semantic_key.content_words
    return _normalized(stored, asked) or semantic_key._fronted(asked, cw(stored)) or semantic_key._fronted(stored, cw(asked))


VARIANTS = (
    ("E2 same content words", lambda stored, asked: e2_words(stored) == e2_words(asked)),
    ("normalized (contractions, more fillers)", _normalized),
    ("+ fronted clause", _fronted),
    ("+ misspellings (shipped)", lambda stored, asked: semantic_key.same_words(asked, stored)),
)


def variant_table(scores: Sequence[Scored], floors: Sequence[float]) -> str:
    lines = ["| cosine floor | " + " | ".join(f"{name}: hits / false hits" for name, _ in VARIANTS) + " |"]
    lines.append("|---|" + "---|" * len(VARIANTS))
    dup = [s for s in scores if s.duplicate]
    neg = [s for s in scores if not s.duplicate]
    for floor in floors:
        cells = []
        for _, same in VARIANTS:
            served = [s for s in scores if s.same_partition and s.compatible and s.similarity >= floor and same(*s.texts)]
            hits, wrong = sum(s.duplicate for s in served), sum(not s.duplicate for s in served)
            cells.append(f"{hits / len(dup):.1%} / {wrong} of {len(neg)}")
        mark = " (shipped)" if floor == semantic_key.WORDS_FLOOR else ""
        lines.append(f"| {floor:.2f}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Conversation candidates: how the earlier turns of a stored and a new conversation may differ and
# still share an answer (the last message must pass ``semantic_key.decide`` at the shipped defaults).
_NUMBER_OR_NEGATION = re.compile(r"\d|^(?:not|no|never|none|nothing|nobody|neither|nor|without|cannot)$")


def turn_words(messages: list[dict[str, str]]) -> list[str]:
    out: list[str] = []
    for m in messages:
        out += [f"<{m['role']}>", *semantic_key.content_words(m["content"])]
    return out


def inserted_only(stored: list[dict[str, str]], asked: list[dict[str, str]], clean: bool = False) -> bool:
    """One side's earlier turns are the other's with words or turns added, nothing changed or moved
    (``clean``: and nothing added holds a number or a negation)."""
    short, long = sorted((turn_words(stored), turn_words(asked)), key=len)
    for tag, _, _, j1, j2 in difflib.SequenceMatcher(None, short, long, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if tag != "insert" or (clean and any(_NUMBER_OR_NEGATION.search(w) for w in long[j1:j2])):
            return False
    return True


def conversation_table(scores: Sequence[Scored], rows: Sequence[dict[str, Any]], context_similarity: dict[str, float]) -> str:
    by_id = {r["id"]: r for r in rows}

    def question(s: Scored) -> bool:  # the last message as decide() judges it, the earlier turns aside
        return replace(s, same_partition=True).served(semantic_key.DEFAULT_THRESHOLD)

    rules: list[tuple[str, Any]] = [
        ("earlier turns exactly (before)", lambda s, a, b: a[:-1] == b[:-1]),
        ("as content words (shipped)", lambda s, a, b: s.same_partition),
        ("+ turns or words inserted", lambda s, a, b: inserted_only(a[:-1], b[:-1])),
        ("+ inserted, no numbers or negations", lambda s, a, b: inserted_only(a[:-1], b[:-1], clean=True)),
    ]
    for t in (0.90, 0.95, 0.97) if context_similarity else ():
        guard = lambda s, a, b: semantic_key.compatible(_joined(b), _joined(a))  # noqa: E731
        rules.append(
            (f"context cosine ≥ {t} + guard", lambda s, a, b, t=t, g=guard: context_similarity[s.id] >= t and g(s, a, b))
        )
    lines = ["| earlier turns compared | duplicates served | false hits |", "|---|---|---|"]
    dup = [s for s in scores if s.duplicate]
    neg = [s for s in scores if not s.duplicate]
    for name, rule in rules:
        served = [s for s in scores if question(s) and rule(s, by_id[s.id]["a"], by_id[s.id]["b"])]
        hits, wrong = sum(s.duplicate for s in served), sum(not s.duplicate for s in served)
        lines.append(f"| {name} | {hits / len(dup):.1%} ({hits} of {len(dup)}) | {wrong} of {len(neg)} |")
    return "\n".join(lines)


def _joined(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages[:-1])


def context_similarities(rows: Sequence[dict[str, Any]], embedder: LocalEmbedder) -> dict[str, float]:
    """Cosine of the two sides' earlier turns, each embedded as one text (the model reads its first 256 tokens)."""
    pairs = [(r["id"], _joined(r["a"]), _joined(r["b"])) for r in rows if r["kind"] == "conversation"]
    unique = sorted({t for _, a, b in pairs for t in (a, b)})
    vectors = dict(zip(unique, embedder.embed_sync(unique), strict=True))
    return {i: float(vectors[a] @ vectors[b]) for i, a, b in pairs}


def report(
    scores: Sequence[Scored], seconds: float, command: str, rows: Sequence[dict[str, Any]], context: dict[str, float]
) -> str:
    shipped = semantic_key.DEFAULT_THRESHOLD
    out = [
        "# Semantic cache precision: results",
        "",
        f"`{command}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, embedder"
        f" {LocalEmbedder.name}, shipped `DEFAULT_THRESHOLD` = {shipped} (cosine tier), `WORDS_FLOOR` ="
        f" {semantic_key.WORDS_FLOOR} (words tier); embedding and scoring took {seconds:.1f} s.",
        "",
    ]
    for kind in ("question", "conversation"):
        mine = [s for s in scores if s.kind == kind]
        if not mine:
            continue
        dup = sum(s.duplicate for s in mine)
        point, upper = least_threshold(mine, bound=False), least_threshold(mine, bound=True)
        out += [
            f"## {kind.capitalize()} pairs ({len(mine)}: {dup} duplicates, {len(mine) - dup} not)",
            "",
            sweep_table(mine, THRESHOLDS, shipped),
            "",
            f"Least threshold with a false-hit rate ≤ 1% (thrifty): {_t(point)}; with its 95% upper bound ≤ 1%: {_t(upper)}.",
            "",
            f"At the shipped default {shipped}, by category:",
            "",
            category_table(mine, shipped),
            "",
        ]
        wrong = [s for s in mine if not s.duplicate and s.served(shipped)]
        if wrong:
            out += ["False hits at the default: " + ", ".join(f"{s.id} ({s.similarity:.3f})" for s in wrong), ""]
        if kind == "question":
            out += [
                "The words tier alone, step by step (partition and guard on, no cosine tier): hit rate / false hits.",
                "",
                variant_table(mine, (0.0, semantic_key.WORDS_FLOOR, 0.8, 0.9)),
                "",
            ]
        else:
            out += [
                "Candidates for the earlier turns, at the shipped defaults for the last message"
                + ("" if context else " (the context-embedding rows: `--context-embedding`)")
                + ":",
                "",
                conversation_table(mine, rows, context),
                "",
            ]
    return "\n".join(out)


def _t(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "none up to 1.000"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.cache_precision", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--pairs", type=Path, default=PAIRS)
    parser.add_argument("--limit", type=int, help="only the first N pairs of each kind")
    parser.add_argument("--write-results", action="store_true", help=f"write the report to {RESULTS}")
    parser.add_argument("--context-embedding", action="store_true", help="also embed earlier turns (a few minutes)")
    args = parser.parse_args(argv)
    rows = []
    for kind in ("question", "conversation"):
        mine = load_pairs(args.pairs, kind)
        rows += mine[: args.limit] if args.limit else mine
    started = time.perf_counter()
    embedder = LocalEmbedder()
    scores = score(rows, embedder)
    seconds = time.perf_counter() - started
    context = context_similarities(rows, embedder) if args.context_embedding else {}
    command = "python -m tests.benchmarks.cache_precision " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(scores, seconds, command.strip(), rows, context)
    print(text)
    if args.write_results:
        # Hand-written notes below the marker survive a rerun.
        old = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else ""
        notes = old[old.index(NOTES) :] if NOTES in old else NOTES + "\n"
        RESULTS.write_text(text + "\n" + notes, encoding="utf-8")
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
