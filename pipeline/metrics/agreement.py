"""Text-image agreement that works offline: does a sample show the class its prompt names?

For prompts made from class names (data.captions = "templates") each sample has the class of its
prompt. A k-NN classifier on teacher features judges the sample's class:

    bank      the mean patch token of the teacher (DINOv2, as cached by the teacher stage) of real
              training images, with their labels;
    query     the same feature of each generated image (the teacher run on it, same preprocessing);
    class     the majority label of its k = 5 nearest bank rows by cosine similarity
              (pipeline.teachers.probe.knn_predict);
    agreement the share of samples whose judged class is their prompt's class.

Two references put the number in scale: `agreement_real`, the same classifier on held-out real
images of the bank's distribution (5/6 of the bank judges the other 1/6: what a perfect generator
would score), and `agreement_chance`, the share of the most frequent prompt class.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.teachers.probe import knn_accuracy, knn_predict


def prompt_agreement(bank: np.ndarray, bank_labels: np.ndarray, samples: np.ndarray, prompt_labels: np.ndarray,
                     k: int = 5) -> dict[str, float]:
    """bank [N, D] and samples [M, D] features, bank_labels [N], prompt_labels [M] (-1: no class, left out)."""
    keep = np.asarray(prompt_labels) >= 0
    if not keep.any():
        raise ValueError("no sample has a prompt class (prompts from a file carry none)")
    b, lab = torch.from_numpy(np.asarray(bank, np.float32)), torch.from_numpy(np.asarray(bank_labels, np.int64))
    pred = knn_predict(b, lab, torch.from_numpy(np.asarray(samples, np.float32)[keep]), k).numpy()
    want = np.asarray(prompt_labels)[keep]
    split = max(k, int(round(len(b) * 5 / 6)))
    return {"agreement": float((pred == want).mean()),
            "agreement_real": knn_accuracy(b, lab, split, k) if split < len(b) else float("nan"),
            "agreement_chance": float(np.bincount(want).max() / len(want)),
            "agreement_samples": int(keep.sum())}
