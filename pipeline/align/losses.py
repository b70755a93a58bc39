"""The alignment losses of REPA, U-REPA and HASTE, as plain functions of tensors.

Every function returns a 0-d float32 tensor and computes in float32 with autocast switched off,
whatever the input dtype, so bf16/fp16 training gives the same loss as fp32 up to input rounding.
None of them synchronises with the host.

    repa_loss(student [B,T,D], teacher [B,T,D])
        mean over b, n of -cos(s_bn, t_bn)
    manifold_loss(student [B,T,D], teacher [B,T,D], over="tokens" | "samples")
        tokens:  mean over b of mean over (i, j) of (cos(t_bi, t_bj) - cos(s_bi, s_bj))**2
        samples: mean over n of mean over (a, b) of (cos(t_an, t_bn) - cos(s_an, s_bn))**2
    attention_ce(student_logits [B,H,T,T], teacher_logits [B,H,T,T])
        mean over b, h, query rows q of -sum_k softmax(teacher)_qk * log_softmax(student)_qk
    spatial_normalize(tokens [B,T,D], gamma)           (iREPA's target normalisation, not a loss)
        u = y - gamma * mean_T(y);  u / (std_T(u) + 1e-6), std with Bessel's correction
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Literal

import torch
import torch.nn.functional as F

ManifoldOver = Literal["tokens", "samples"]
MANIFOLD_OVER = ("tokens", "samples")


# ----------------------------------------------------------------------------------------------
#                                         Helpers
# ----------------------------------------------------------------------------------------------


def _no_autocast(x: torch.Tensor) -> AbstractContextManager:
    """Switch autocast off for x's device type, so float32 inputs stay float32 inside matmuls."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _check_same_shape(name: str, student: torch.Tensor, teacher: torch.Tensor, ndim: int) -> None:
    if student.ndim != ndim or teacher.shape != student.shape:
        raise ValueError(
            f"{name}: student and teacher must both have {ndim} dims and the same shape; "
            f"got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities inside each group: x [G, M, D] -> [G, M, M] (float32)."""
    u = F.normalize(x.float(), dim=-1)
    return torch.bmm(u, u.transpose(1, 2))


def spatial_normalize(tokens: torch.Tensor, gamma: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """iREPA's spatial normalisation of teacher patch tokens (arXiv 2512.10794), per image and channel.

    tokens [B, T, D] -> float32 [B, T, D]: u = y - gamma * mean over tokens of y, then
    u / (std over tokens of u + eps), the std unbiased (T - 1), as the paper's code writes it. Removing
    the mean over the image takes away the component every token shares (the global, image-level
    part), so the cosine targets that remain contrast regions of the image with each other.
    """
    if tokens.ndim != 3 or tokens.shape[1] < 2:
        raise ValueError(f"spatial_normalize: tokens must be [B, T, D] with T >= 2, got {tuple(tokens.shape)}")
    with _no_autocast(tokens):
        u = tokens.float()
        u = u - gamma * u.mean(dim=1, keepdim=True)
        return u / (u.std(dim=1, keepdim=True) + eps)


# ----------------------------------------------------------------------------------------------
#                                      REPA feature loss
# ----------------------------------------------------------------------------------------------


def repa_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity per token, averaged over batch and tokens.

    student, teacher: [B, T, D] (student already projected to the teacher width D and resized to
    the teacher's T tokens). Returns a 0-d float32 tensor in [-1, 1]; -1 means perfect alignment.
    """
    _check_same_shape("repa_loss", student, teacher, ndim=3)
    with _no_autocast(student):
        cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1)  # [B, T]
        return -cos.mean()


# ----------------------------------------------------------------------------------------------
#                                   U-REPA manifold loss
# ----------------------------------------------------------------------------------------------


def manifold_loss(
    student: torch.Tensor, teacher: torch.Tensor, over: ManifoldOver = "tokens"
) -> torch.Tensor:
    """Mean squared difference between teacher and student cosine-similarity matrices.

    student, teacher: [B, T, D].
    over="tokens":  one T x T matrix per image over its tokens, S_ij = cos(x_bi, x_bj); the result
                    is the mean over images and all T*T entries (diagonal included; it is 1 - 1 = 0).
    over="samples": one B x B matrix per token position n across the batch, S_ab = cos(x_an, x_bn);
                    the result is the mean over positions and all B*B entries.
    Dividing by the number of entries keeps the weight of the term independent of T and B.
    Memory: a [B, T, T] (tokens) or [T, B, B] (samples) float32 matrix for each side.
    """
    _check_same_shape("manifold_loss", student, teacher, ndim=3)
    if over not in MANIFOLD_OVER:
        raise ValueError(f"manifold_loss: over={over!r} is not one of {MANIFOLD_OVER}")
    with _no_autocast(student):
        if over == "samples":
            student, teacher = student.transpose(0, 1), teacher.transpose(0, 1)  # [T, B, D]
        diff = cosine_matrix(teacher) - cosine_matrix(student)
        return diff.square().mean()


# ----------------------------------------------------------------------------------------------
#                                  HASTE attention loss
# ----------------------------------------------------------------------------------------------


def attention_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from the teacher's attention distribution to the student's, temperature 1.

    student_logits, teacher_logits: [B, H, T, T] pre-softmax logits (query rows, key columns).
    Softmax runs over keys (last dim). Returns the mean over B, H and the T query rows of
    -sum_k p_teacher[k] * log p_student[k], as a 0-d float32 tensor.
    """
    _check_same_shape("attention_ce", student_logits, teacher_logits, ndim=4)
    with _no_autocast(student_logits):
        p_teacher = torch.softmax(teacher_logits.float(), dim=-1)
        log_p_student = torch.log_softmax(student_logits.float(), dim=-1)
        return -(p_teacher * log_p_student).sum(dim=-1).mean()
