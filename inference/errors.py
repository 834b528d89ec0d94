"""Errors shared by the inner updates."""

from __future__ import annotations

__all__ = ["InnerLoopDivergedError"]


class InnerLoopDivergedError(RuntimeError):
    """The inner update produced a NaN / inf ELBO or posterior; the message names the task(s) and the step."""
