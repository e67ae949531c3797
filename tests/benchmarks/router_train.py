"""Train the difficulty model (proxy/policy/difficulty.json) on tests/data/routing/ (split "train" only).

Seeded and reproducible: `.venv/bin/python -m tests.benchmarks.router_train`. Embeds every prompt
with the gateway's LocalEmbedder (int8 MiniLM), fits a class-balanced, L2-regularized logistic
regression by full-batch gradient descent, and prints what trained on what. The test split and
the held-out sources are never read here (router_curve.py reports on them).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy.cache.embedder import LocalEmbedder
from proxy.policy.difficulty import DifficultyModel, structural

DATA = Path(__file__).parents[1] / "data" / "routing" / "prompts.jsonl.gz"
L2 = 1e-3
STEPS = 1500
RATE = 0.5


def rows(split: str) -> list[dict[str, Any]]:
    with gzip.open(DATA, "rt", encoding="utf-8") as fh:
        return [r for r in map(json.loads, fh) if r["split"] == split]


def last_user(text: Any) -> tuple[str, int]:
    if isinstance(text, str):
        return text, 1
    users = [m["content"] for m in text if m.get("role") == "user"]
    return users[-1], len(users)


def featurize(embedder: LocalEmbedder, items: list[dict[str, Any]]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    texts = [last_user(r["text"]) for r in items]
    vectors = embedder.embed_sync([t for t, _ in texts])
    extra = np.stack([structural(t, d) for t, d in texts])
    return vectors, extra


def fit(
    vectors: npt.NDArray[np.float32], extra: npt.NDArray[np.float32], y: npt.NDArray[np.float64], note: str
) -> DifficultyModel:
    mean, scale = extra.mean(axis=0), extra.std(axis=0) + 1e-6
    x = np.hstack([vectors, (extra - mean) / scale]).astype(np.float64)
    weight = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(STEPS):
        p = 1 / (1 + np.exp(-(x @ w + b)))
        g = weight * (p - y)
        w -= RATE * (x.T @ g / len(y) + L2 * w)
        b -= RATE * float(g.mean())
    return DifficultyModel(w.astype(np.float32), b, mean.astype(np.float32), scale.astype(np.float32), note)


def main() -> None:
    train = rows("train")
    sources = sorted({r["source"].split(":")[0] for r in train})
    y = np.array([r["label"] == "hard" for r in train], dtype=np.float64)
    note = f"{DATA.name} split=train: {len(train)} prompts ({int(y.sum())} hard) from {', '.join(sources)}"
    print("training on", note)
    vectors, extra = featurize(LocalEmbedder(), train)
    model = fit(vectors, extra, y, note)
    model.save()
    print("wrote proxy/policy/difficulty.json:", model.weights.shape[0], "weights")


if __name__ == "__main__":
    main()
