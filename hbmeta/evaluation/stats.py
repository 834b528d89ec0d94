"""Summary statistics over meta-test tasks."""

from __future__ import annotations

import math

import torch

__all__ = ["mean_ci95"]


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal 95% confidence interval over tasks."""
    values = values.double()
    half = 1.96 * values.std(unbiased=True).item() / math.sqrt(values.numel()) if values.numel() > 1 else float("nan")
    return values.mean().item(), half
