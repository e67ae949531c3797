"""The learned difficulty score behind the ``difficulty`` matcher: 0 (a small model will do) to 1 (hard).

Sits in the route stage, computed only when the live policy has a ``difficulty`` rule. Input:
the 384-d all-MiniLM-L6-v2 embedding of the last user message (the semantic cache's embedder,
``proxy.cache.embedder.LocalEmbedder``) plus a few structural features of the text (length,
multiple-choice options, numbers and formulas, code, constraint words, conversation depth).
The model is a logistic regression trained by ``tests/benchmarks/router_train.py`` on
``tests/data/routing/`` (see the README there for which data trained it); its weights ship in
``difficulty.json`` beside this module (~400 floats, a few KB in memory). Scoring is one dot
product: pure, numpy only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

WEIGHTS_FILE = Path(__file__).with_name("difficulty.json")
STRUCTURAL = ("log_chars", "lines", "options", "digits", "math", "code", "constraints", "questions", "depth")
_OPTION = re.compile(r"^\s*\(?[A-Ea-e][.)]\s", re.M)
_MATH = re.compile(r"[=+*/^<>]|\d\s*[-x]\s*\d|\bsqrt\b|\bmod\b")
_CODE = re.compile(r"```|\bdef |\bclass |\breturn\b|[{};]\s*$|=>|\bimport ", re.M)
_CONSTRAINTS = re.compile(
    r"\b(must|exactly|at least|at most|only if|unless|each|every|prove|derive|step by step|which of the following)\b", re.I
)


def structural(text: str, depth: int) -> npt.NDArray[np.float32]:
    """The hand-made features, in :data:`STRUCTURAL` order (unscaled)."""
    head = text[:4000]
    return np.array(
        [
            math.log1p(len(text)),
            math.log1p(head.count("\n")),
            min(len(_OPTION.findall(head)), 6),
            math.log1p(sum(c.isdigit() for c in head)),
            math.log1p(len(_MATH.findall(head))),
            math.log1p(len(_CODE.findall(head))),
            math.log1p(len(_CONSTRAINTS.findall(head))),
            min(head.count("?"), 5),
            math.log1p(depth),
        ],
        dtype=np.float32,
    )


@dataclass(frozen=True, slots=True)
class DifficultyModel:
    weights: npt.NDArray[np.float32]  # embedding dims, then structural
    bias: float
    mean: npt.NDArray[np.float32]  # structural features' scaling
    scale: npt.NDArray[np.float32]
    trained_on: str = ""

    def score(self, vector: npt.NDArray[np.float32], text: str, depth: int = 1) -> float:
        z = (structural(text, depth) - self.mean) / self.scale
        logit = float(self.weights[: vector.shape[0]] @ vector + self.weights[vector.shape[0] :] @ z) + self.bias
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, logit))))

    def save(self, path: Path = WEIGHTS_FILE) -> None:
        data = {
            "trained_on": self.trained_on,
            "structural": list(STRUCTURAL),
            "bias": round(self.bias, 6),
            "mean": [round(float(x), 6) for x in self.mean],
            "scale": [round(float(x), 6) for x in self.scale],
            "weights": [round(float(x), 6) for x in self.weights],
        }
        path.write_text(json.dumps(data, indent=0) + "\n", encoding="utf-8")


def load(path: Path = WEIGHTS_FILE) -> DifficultyModel:
    data = json.loads(path.read_text(encoding="utf-8"))

    def array(key: str) -> npt.NDArray[np.float32]:
        return np.asarray(data[key], dtype=np.float32)

    return DifficultyModel(array("weights"), float(data["bias"]), array("mean"), array("scale"), str(data.get("trained_on", "")))
