"""A sanity probe of cached teacher features: does the teacher see the classes better than a random one?

Aligning to the wrong thing (random weights, a wrong preprocessing, a wrong layer) fails silently:
training still runs and the loss still falls. The probe is a k-nearest-neighbour classifier on the
mean patch token of each image, on the store's own labels: the first `bank` images are the
neighbour bank, the rest are the queries; cosine similarity, majority vote of the k nearest (ties go
to the class of the nearest tied neighbour).

A random-init ViT is not at chance on easy data (its mean token still carries pixel statistics), so
the verdict compares the teacher with a random-init copy of the same architecture on the same images:
the teacher is `suspect` when it does not beat both chance and that baseline by `margin`. With fewer
than `min_per_class` bank images per class the probe is `inconclusive` (e.g. 1000 ImageNet images).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ProbeResult:
    knn: float  # accuracy of the teacher's mean patch token
    knn_random_init: float  # the same probe on a random-init teacher of the same architecture
    chance: float  # accuracy of always answering the most frequent bank class
    images: int
    bank: int
    k: int
    verdict: str  # "ok" | "suspect" | "inconclusive"

    def as_dict(self) -> dict:
        return asdict(self)

    def message(self) -> str:
        head = (f"teacher probe: k-NN (k={self.k}, {self.bank} bank / {self.images - self.bank} query images) "
                f"on the mean patch token {self.knn:.1%}; random-init teacher {self.knn_random_init:.1%}; "
                f"chance {self.chance:.1%}")
        if self.verdict == "suspect":
            return (head + ". WARNING: the teacher's features are no better than a random-init teacher's: check "
                           "teacher.weights, the preprocessing and the cached layer before training on them")
        if self.verdict == "inconclusive":
            return head + " (too few images per class to judge)"
        return head


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Cosine k-NN: each query [Q, D] gets the majority label of its k nearest bank rows [B, D]
    (labels [B] int64); a tie goes to the class of the nearest tied neighbour. -> int64 [Q]."""
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k-NN needs 1 <= k <= bank size, got k={k}, bank {bank.shape[0]}")
    sim = F.normalize(queries.double(), dim=1) @ F.normalize(bank.double(), dim=1).T  # [Q, B]
    neighbour = bank_labels[sim.topk(k, dim=1).indices]  # [Q, k], nearest first
    classes = int(bank_labels.max()) + 1
    votes = F.one_hot(neighbour, classes).sum(1).double()  # [Q, C]
    order_bonus = F.one_hot(neighbour, classes).double() * (1e-3 / (1 + torch.arange(k, dtype=torch.float64)))[:, None]
    return (votes + order_bonus.sum(1)).argmax(1)


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, bank: int, k: int = 5) -> float:
    """Accuracy of cosine k-NN: rows [bank:] classified by the labels of their k nearest rows in [:bank].

    features [N, D] float, labels [N] int64; 1 <= k <= bank < N.
    """
    n = features.shape[0]
    if not 1 <= k <= bank < n:
        raise ValueError(f"k-NN probe needs 1 <= k <= bank < N, got k={k}, bank={bank}, N={n}")
    predicted = knn_predict(features[:bank], labels[:bank], features[bank:], k)
    return float((predicted == labels[bank:]).double().mean())


def probe(features: torch.Tensor, random_features: torch.Tensor, labels: np.ndarray | torch.Tensor, *,
          k: int = 5, bank_fraction: float = 5 / 6, margin: float = 0.05, min_per_class: int = 5) -> ProbeResult:
    """Probe mean-token features [N, D] of the teacher against those of a random-init one [N, D]."""
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    n = int(labels_t.shape[0])
    bank = max(k, min(n - 1, int(round(n * bank_fraction))))
    counts = torch.bincount(labels_t[:bank])
    chance = float((labels_t[bank:] == counts.argmax()).double().mean())
    acc = knn_accuracy(features, labels_t, bank, k)
    base = knn_accuracy(random_features, labels_t, bank, k)
    classes = int((counts > 0).sum())
    if bank < min_per_class * max(classes, 1):
        verdict = "inconclusive"
    elif acc <= max(chance, base) + margin:
        verdict = "suspect"
    else:
        verdict = "ok"
    return ProbeResult(round(acc, 4), round(base, 4), round(chance, 4), n, bank, k, verdict)
