r"""The Gauss-Newton direction without a Jacobian: preconditioned conjugate gradients on ``(Lambda_0 + J^T H J) d = -b``.

For networks whose Jacobian is too large to form (conv4: 112k weights x 5 classes x every support and query
image, with batch norm coupling the images so that each row costs a full backward pass), the Gauss-Newton
system of :mod:`hbmeta.inference.gauss_newton` is solved matrix-free, all tasks at once, with

- Gauss-Newton-vector products :math:`A v = \Lambda_0 v + J^\top H (J v)`: ``J v`` by a one-sided finite
  difference of the network's outputs (one forward pass; exact for the piecewise-linear parts of a ReLU net,
  ``O(eps)`` elsewhere - torch's forward mode is 5x a forward pass on conv4 on a CPU), ``J^T u`` by one
  vector-Jacobian product;
- a Jacobi preconditioner :math:`\Lambda_0 + \widehat{\mathrm{diag}}(J^\top H J)`, the diagonal estimated by
  Hutchinson's identity :math:`\mathbb{E}_z[(J^\top R z)^{\odot 2}] = \mathrm{diag}(J^\top R R^\top J)` with
  Rademacher ``z`` (one VJP per probe); the same estimate gives the mean-field variances
  :math:`1 / (1/v_0 + \widehat{\mathrm{diag}})`;
- ``cg_steps`` iterations from ``d = 0``. One iteration is the preconditioned gradient step with its exact
  Gauss-Newton step length :math:`-b^\top M^{-1} b / (p^\top A p)`, so even one iteration corrects the overshoot a
  diagonal step has when the weights are coupled; more iterations approach the Woodbury solve.

Cost per step: one VJP for ``b``, ``probes`` VJPs, and per CG iteration one forward and one VJP.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.saved_tensors import untracked

__all__ = ["cg_direction", "ggn_diagonal"]


def _vjp(model: HierarchicalModel, m: Tensor, x: Tensor):
    """``(f(m) [T, N, O...], pullback)`` with ``pullback(u [T, N, O...]) = J^T u`` ``[T, P]``."""
    with torch.enable_grad():
        f, pullback = torch.func.vjp(lambda theta: model.net(theta, x), m)
    return f.detach(), lambda u: pullback(u)[0].detach()


def ggn_diagonal(pullback, factor: Tensor, shape: torch.Size, probes: int, generator: torch.Generator | None) -> Tensor:
    """Hutchinson's estimate of ``diag(J^T R R^T J)`` ``[T, P]`` from ``probes`` Rademacher probes of shape ``shape``."""
    total = None
    for _ in range(probes):
        z = torch.randint(0, 2, shape, generator=generator, device=factor.device).to(factor.dtype) * 2 - 1
        u = pullback((factor @ z.unsqueeze(-1)).squeeze(-1))  # J^T R z
        total = u.pow(2) if total is None else total + u.pow(2)
    return total / probes


@untracked()
def cg_direction(model: HierarchicalModel, m: Tensor, x: Tensor, y: Tensor, prior_loc: Tensor, prior_var: Tensor,
                 cg_steps: int, probes: int = 1, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The truncated-CG Gauss-Newton direction ``d [T, P]`` at ``m`` and the estimated ``diag(J^T H J)`` ``[T, P]``."""
    f, pullback = _vjp(model, m, x)
    grad_f, factor = model.likelihood.curvature(f, y)                     # [T, N, O], R
    out_shape = f.shape
    factor = factor.expand(*grad_f.shape, grad_f.shape[-1])
    hess = factor @ factor.transpose(-1, -2)                              # H per point, [T, N, O, O]
    precision = 1.0 / prior_var
    b = pullback(grad_f.reshape(out_shape)) + (m - prior_loc) * precision
    diagonal = ggn_diagonal(lambda u: pullback(u.reshape(out_shape)), factor, grad_f.shape, probes, generator)
    preconditioner = precision + diagonal
    scale = 1e-3 * prior_var.sqrt()                                       # finite-difference step per weight

    def ggn_product(v: Tensor) -> Tensor:
        eps = 1.0 / v.div(scale).abs().amax(-1, keepdim=True).clamp_min(1e-30)  # move each weight <= 1e-3 prior sd
        jv = (model.net(m + eps * v, x) - f).reshape(grad_f.shape) / eps.unsqueeze(-1)
        return pullback((hess @ jv.unsqueeze(-1)).squeeze(-1).reshape(out_shape)) + precision * v

    d = torch.zeros_like(m)
    r = -b
    z = r / preconditioner
    p = z
    rz = (r * z).sum(-1, keepdim=True)
    for _ in range(cg_steps):
        ap = ggn_product(p)
        alpha = rz / (p * ap).sum(-1, keepdim=True).clamp_min(1e-30)
        d = d + alpha * p
        r = r - alpha * ap
        z = r / preconditioner
        rz_new = (r * z).sum(-1, keepdim=True)
        p = z + (rz_new / rz.clamp_min(1e-30)) * p
        rz = rz_new
    return d, diagonal
