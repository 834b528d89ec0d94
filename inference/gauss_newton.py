r"""Gauss-Newton mean-field VI: an inner update that moves as far as the data ask, with no step size.

The default inner update of GEM-BML and GEM-BML+ (README, "Defaults"). For every task of a meta-batch, with
the prior inside the ELBO a diagonal Gaussian :math:`N(\mu_0, \mathrm{diag}\, v_0)` (the prior ``Theta``, or
q1 in the sequential update) and the guide a mean-field Normal :math:`N(m, \mathrm{diag}\, s^2)`, one step at
the current mean ``m`` is:

1. **Linearise** the network, :math:`f(x; \theta) \approx f(x; m) + J (\theta - m)` with
   :math:`J = \partial f / \partial \theta` (``[N O, P]``, :mod:`hbmeta.models.jacobian`), and take the likelihood's
   gradient ``g`` and Gauss-Newton Hessian :math:`H = R R^\top` in the outputs
   (:meth:`hbmeta.models.likelihoods.Likelihood.curvature`: :math:`I / s^2` for a Gaussian,
   :math:`\mathrm{diag}\, p - p p^\top` for a softmax, by autograd for any other likelihood). With
   ``curvature="expected"`` (the default) a likelihood that is not quadratic in ``f`` takes both averaged over the
   current posterior's spread in function space, :math:`f \sim N(f(x; m), J S J^\top)` (fixed antithetic draws;
   :func:`function_space_spread`), and the line search scores the objective with the same draws: the Bayesian
   learning rule's Gaussian-VI step, whose fixed point is the mean-field ELBO's optimum for a model linear in its
   weights. At the mean (``"mean"``) it is the Laplace step, whose softmax curvature vanishes where the support set is
   fitted confidently and so leaves the posterior as wide as the prior there.
2. **Solve the coupled Gauss-Newton system exactly, in function space.** With the whitened Jacobian
   :math:`G = R^\top J` and :math:`\Lambda_0 = \mathrm{diag}(1 / v_0)`,

   .. math::
       d = -(\Lambda_0 + G^\top G)^{-1} b, \quad b = J^\top g + \Lambda_0 (m - \mu_0), \qquad
       (\Lambda_0 + G^\top G)^{-1} = \Sigma_0 - \Sigma_0 G^\top (I + G \Sigma_0 G^\top)^{-1} G \Sigma_0

   (Woodbury): one ``(N O) x (N O)`` Cholesky solve per task instead of a ``P x P`` one.
3. **Backtracking line search** on the task's MAP objective
   :math:`-\log p(D \mid \theta) + \tfrac12 \sum_i (\theta_i - \mu_{0,i})^2 / v_{0,i}`: the steps
   :math:`m + t d`, :math:`t = r, r/2, \dots, r 2^{-h}`, are scored in ONE batched forward pass and each task
   keeps the largest that lowers it. Each task has a reach ``r``: 1, except after a step in which no candidate
   helped and the task stayed where it was - then half the smallest one tried, so a task on a very curved
   stretch keeps shrinking its step instead of being stuck.
4. **Variance**: the mean-field fixed point :math:`s^2 = 1 / (1 / v_0 + \mathrm{diag}\, G^\top G)`.

Why this is VI: for the linearised model the posterior is Gaussian with precision :math:`\Lambda_0 + G^\top G`;
the mean-field Gaussian that minimises :math:`\mathrm{KL}(q \,\|\, p)` to it has exactly its mean and the
precision's diagonal (steps 2 and 4). This is the natural-gradient VI step of the Bayesian learning rule [1]
with step size 1 and expectations at the mean, for a mean-field Gaussian - except that the mean's linear system
is solved exactly. A *diagonal* natural-gradient step is a Jacobi iteration on that system and is stable only
for :math:`\beta < 2 / \lambda_{\max}(D^{-1} A)`, which shrinks like :math:`1/\sigma^2` as the prior widens
(measured in ``research/ng-inner-update-prototype``); the Woodbury solve has no such bound, and a tight
prior simply gives a small (the Bayesian) move. For a linear-Gaussian model one step reaches the exact
posterior mean (``tests/test_gauss_newton.py``). No Monte-Carlo noise enters: the update is deterministic.

Costs per step: the Jacobian (``N O`` reverse passes, or the MLP closed form), a ``[T, NO, NO]`` kernel and
``2^{-h}``-grid forward pass; memory ``T N O P`` for ``J``, independent of the number of steps. GEM-BML+'s two fits
from the prior (restart mode: ``D_tr`` and ``D_tr u D_val``) share their first linearisation, whose leading rows are
the support set's (:func:`gauss_newton_fit_pair`, :meth:`Linearisation.leading`).

[1] Khan & Rue, *The Bayesian learning rule*, JMLR 2023. [2] Martens & Grosse 2015 / Immer et al. 2021 on
the generalised Gauss-Newton and linearised Laplace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from hbmeta.inference.errors import InnerLoopDivergedError
from hbmeta.inference.gauss_newton_cg import cg_direction
from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.jacobian import output_jacobian
from hbmeta.models.likelihoods import gaussian_draws
from hbmeta.models.posterior import Posterior

__all__ = ["gauss_newton_fit", "gauss_newton_fit_pair", "gauss_newton_linearise", "Linearisation", "gauss_newton_direction",
           "map_objective", "prior_term_along", "function_space_spread", "CURVATURES"]

#: where a mean-field Gauss-Newton step takes the likelihood's curvature (:func:`gauss_newton_fit`'s ``curvature``)
CURVATURES = ("expected", "mean")


def map_objective(model: HierarchicalModel, theta: Tensor, x: Tensor, y: Tensor, prior_loc: Tensor,
                  prior_var: Tensor, spread: Tensor | None = None, prior_term: Tensor | None = None) -> Tensor:
    """Per-task negative log joint ``-log p(D | theta) + sum (theta - mu0)^2 / (2 v0)`` for ``theta [*S, T, P]``.

    With ``spread [K, T, N, O]`` (draws of the posterior's spread in function space) the likelihood term is its
    average over the outputs ``f(x; theta) + spread_k``: the part of the negative ELBO that the mean moves, for the
    posterior's current variances. ``prior_term`` ``[*S, T]``, if given, is the prior part already computed."""
    if prior_term is None:
        prior_term = 0.5 * ((theta - prior_loc).square() / prior_var).sum(-1)
    if spread is None:
        return -model.log_likelihood(theta, x, y) + prior_term
    f = model.net(theta, x)                                      # [*S, T, N, *out]
    samples = theta.dim() - 2
    shifted = f.unsqueeze(0) + spread.reshape(spread.shape[0], *[1] * samples, *f.shape[samples:])
    return -model.likelihood.log_prob(shifted, y).mean(0) + prior_term


def function_space_spread(jac: Tensor, scale: Tensor, num_draws: int) -> Tensor:
    r"""``[K, T, N, O]`` draws of the mean-field posterior's spread in function space: :math:`N(0, J_n S J_n^\top)`
    per point with :math:`S = \mathrm{diag}(s^2)`, ``jac [T, N, O, P]``, ``scale [T, P]`` (:func:`hbmeta.models.likelihoods.gaussian_draws`)."""
    cov = torch.einsum("tnop,tp,tnqp->tnoq", jac, scale.square(), jac)
    return gaussian_draws(cov, num_draws)


@dataclass(frozen=True)
class Linearisation:
    r"""The network linearised at ``m`` under the likelihood's curvature: what a Gauss-Newton step needs from the data.

    ``f [T, N, *out]`` the outputs; ``scaled = G Sigma0^(1/2)`` ``[T, N O, P]`` (the whitened, prior-scaled Jacobian);
    ``kernel = Gs Gs^T`` ``[T, N O, N O]``; for a likelihood whose ``R`` is one number per point the whitened output
    gradient ``white = g / R`` ``[T, N O, 1]`` (else ``None`` and ``gradient = J^T g`` ``[T, P]``); ``spread`` the
    function-space draws the curvature was averaged over (or ``None``).
    """

    f: Tensor
    scaled: Tensor
    kernel: Tensor
    white: Tensor | None
    gradient: Tensor | None
    spread: Tensor | None

    def leading(self, points: int) -> "Linearisation":
        """The same linearisation for the first ``points`` points of each task (views; nothing is recomputed).

        Exact for a likelihood whose ``R`` is one number per point: every part is per point, or per pair of points for
        the kernel. GEM-BML+'s restart mode fits ``q1`` on ``D_tr`` and ``q2`` on ``D_tr u D_val`` from the same prior,
        so ``q1``'s first step is read off ``q2``'s (:func:`gauss_newton_fit_pair`)."""
        if self.white is None:
            raise ValueError("Linearisation.leading needs a likelihood whose curvature factor is one number per point")
        rows = points * (self.white.shape[1] // self.f.shape[1])
        return Linearisation(self.f[:, :points], self.scaled[:, :rows], self.kernel[:, :rows, :rows],
                             self.white[:, :rows], None, None if self.spread is None else self.spread[:, :, :points])


def gauss_newton_linearise(model: HierarchicalModel, m: Tensor, x: Tensor, y: Tensor, prior_var: Tensor,
                           scale: Tensor | None = None, num_draws: int = 0) -> Linearisation:
    r"""Linearise the network at ``m [T, P]`` (:class:`Linearisation`): the Jacobian (:mod:`hbmeta.models.jacobian`),
    the likelihood's gradient ``g`` and Hessian ``H = R R^T`` in the outputs at ``f(x; m)`` (given the posterior's
    current ``scale [T, P]`` and ``num_draws``, a likelihood that is not quadratic in ``f`` takes their averages over
    ``f(x; m) + spread``: :func:`function_space_spread`,
    :meth:`~hbmeta.models.likelihoods.Likelihood.expected_curvature`), the Jacobian scaled to
    :math:`G_s = R^\top J \Sigma_0^{1/2}` in place, and the kernel :math:`G_s G_s^\top`."""
    f, jac = output_jacobian(model.net, m, x)                    # [T, N, *out], [T, N, O, P]
    spread = None
    if scale is not None and num_draws and not model.likelihood.quadratic:
        spread = function_space_spread(jac, scale, num_draws)    # [K, T, N, O]
        grad_f, factor = model.likelihood.expected_curvature(f, spread, y)
    else:
        grad_f, factor = model.likelihood.curvature(f, y)        # [T, N, O], R broadcastable to [T, N, O, O]
    num_tasks, num_params = m.shape
    prior_sd = prior_var.expand_as(m).sqrt()
    rows = jac.reshape(num_tasks, -1, num_params)                # J, [T, NO, P]
    white = gradient = None
    if factor.shape[-1] == 1:                                    # R is a number per point (Gaussian likelihoods)
        if factor.numel() == 1:
            scaled = rows.mul_(prior_sd.unsqueeze(1) * factor.reshape(()))
        else:
            scaled = rows.mul_(prior_sd.unsqueeze(1)).mul_(factor.reshape(num_tasks, -1, 1))
        white = (grad_f / factor.squeeze(-1)).reshape(num_tasks, -1, 1)  # r = g / R, [T, NO, 1]
    else:
        gradient = torch.bmm(grad_f.reshape(num_tasks, 1, -1), rows).squeeze(1)  # J^T g
        scaled = torch.einsum("tnok,tnop->tnkp", factor.expand(*jac.shape[:2], -1, -1), jac)
        scaled = scaled.reshape(num_tasks, -1, num_params).mul_(prior_sd.unsqueeze(1))
    return Linearisation(f, scaled, scaled @ scaled.transpose(1, 2), white, gradient, spread)


def gauss_newton_direction(model: HierarchicalModel, m: Tensor, x: Tensor, y: Tensor, prior_loc: Tensor,
                           prior_var: Tensor, scale: Tensor | None = None, num_draws: int = 0,
                           linearisation: Linearisation | None = None
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    r"""One Gauss-Newton direction ``d [T, P]`` at ``m [T, P]``, with ``Gs = G Sigma0^(1/2)`` ``[T, NO, P]``, the
    Cholesky factor of ``I + Gs Gs^T`` ``[T, NO, NO]``, the outputs ``f(x; m)`` ``[T, N, O]`` (``prior_loc`` /
    ``prior_var`` broadcast to ``[T, P]``) and the function-space spread it averaged over (or ``None``).

    ``linearisation`` is :func:`gauss_newton_linearise` at ``m`` if it is known already (else it is computed here, with
    ``scale`` and ``num_draws``).

    In function space, with ``delta = m - mu0`` and, for a likelihood whose ``R`` is one number per point, the
    whitened output gradient ``r = g / R``:

    .. math:: \Sigma_0^{1/2} b = G_s^\top r + \Sigma_0^{-1/2}\delta, \quad
              w = (I + G_s G_s^\top)^{-1} G_s \Sigma_0^{1/2} b, \quad
              d = -\delta - \Sigma_0^{1/2} G_s^\top (r - w),

    so a step costs three passes over the Jacobian (scaling, the kernel ``Gs Gs^T``, ``Gs^T (r - w)``) and one
    more away from the prior mean (``Gs Sigma0^(-1/2) delta``). Softmax likelihoods (``R`` a matrix) take ``b``
    directly.
    """
    lin = linearisation or gauss_newton_linearise(model, m, x, y, prior_var, scale, num_draws)
    scaled, white = lin.scaled, lin.white
    prior_sd = prior_var.expand_as(m).sqrt()
    delta = m - prior_loc
    if white is not None:
        c = lin.kernel @ white                                   # Gs Gs^T r ...
        if bool(delta.abs().max() > 0):                          # ... + Gs Sigma0^(-1/2) delta
            c = c + _rows_dot(scaled, delta / prior_sd)
    else:
        c = _rows_dot(scaled, prior_sd * lin.gradient + delta / prior_sd)
    system = lin.kernel.clone()
    system.diagonal(dim1=-2, dim2=-1).add_(1.0)                  # I + Gs Gs^T
    chol = _kernel_cholesky(system, scaled)
    w = torch.cholesky_solve(c.to(chol.dtype), chol).to(c.dtype)
    if white is not None:
        direction = -delta - prior_sd * torch.bmm((white - w).transpose(1, 2), scaled).squeeze(1)
    else:
        direction = -delta - prior_sd * (prior_sd * lin.gradient - torch.bmm(w.transpose(1, 2), scaled).squeeze(1))
    return direction, scaled, chol, lin.f, lin.spread


def _rows_dot(rows: Tensor, vector: Tensor) -> Tensor:
    """``rows [T, R, P] @ vector [T, P]`` as ``[T, R, 1]``: one fused reduction (``bmm`` with a single column is
    measured 11x slower on the CPU at the sinusoid's ``[25, 20, 1761]``)."""
    return torch.linalg.vecdot(rows, vector.unsqueeze(1)).unsqueeze(-1)


def _kernel_cholesky(kernel: Tensor, scaled: Tensor) -> Tensor:
    """The Cholesky factor of ``kernel = I + Gs Gs^T`` (eigenvalues >= 1 in exact arithmetic). In single precision a
    kernel with large entries (a wide prior, large outputs) can lose positive definiteness to rounding; then it is
    formed and factored again from ``scaled = Gs`` in double precision (cheap at ``(N O) x (N O)``)."""
    chol, info = torch.linalg.cholesky_ex(kernel)
    if kernel.dtype != torch.float64 and bool((info != 0).any()):
        exact = scaled.double() @ scaled.double().transpose(1, 2)
        exact.diagonal(dim1=-2, dim2=-1).add_(1.0)
        chol, info = torch.linalg.cholesky_ex(exact)
    if bool((info != 0).any()):
        raise torch.linalg.LinAlgError(f"Gauss-Newton: I + G Sigma0 G^T is not positive definite for task(s) "
                                       f"{(info != 0).nonzero().flatten().tolist()} even in double precision")
    return chol


def gauss_newton_fit(
    model: HierarchicalModel,
    x: Tensor,
    y: Tensor,
    start: Posterior,
    prior_loc: Tensor,
    prior_var: Tensor,
    steps: int,
    kind: str = "meanfield",
    halvings: int = 4,
    callback: Callable[[int, Posterior], None] | None = None,
    laplace: bool = False,
    solver: str = "woodbury",
    cg_steps: int = 3,
    probes: int = 1,
    generator: torch.Generator | None = None,
    variance: str = "meanfield",
    tolerance: float = 0.0,
    curvature: str = "expected",
    num_draws: int = 64,
    first: Linearisation | None = None,
) -> Posterior:
    r"""Run ``steps`` Gauss-Newton VI steps for every task at once from ``start``; the detached posteriors.

    Args:
        model: the hierarchical model (network and likelihood; the prior is given explicitly).
        x, y: ``[T, N, ...]`` data of each task.
        start: where the means start (the prior, or q1 in GEM-BML+).
        prior_loc, prior_var: the diagonal Gaussian prior inside the ELBO, broadcastable to ``[T, P]``.
        kind: ``"meanfield"`` (mean and mean-field variances), ``"delta"`` (the MAP by Gauss-Newton) or
            ``"full"`` (the linearised model's full posterior covariance; small ``P`` only).
        halvings: line-search candidates ``1, 1/2, ..., 2^-halvings``.
        callback: ``callback(step, posterior)`` before the first step and after every step.
        laplace: also keep the linearised model's full Gaussian posterior, :math:`(\Lambda_0 + G^\top G)^{-1}` as
            ``diag(laplace_scale^2) - laplace_factor laplace_factor^T`` (``[T, P, N O]``), for the linearised
            posterior predictive (:meth:`hbmeta.inference.learner.MetaLearner.predict`). Meta-training does not need it.
        solver: ``"woodbury"`` (the exact solve through the Jacobian) or ``"cg"`` (matrix-free truncated conjugate
            gradients with ``cg_steps`` iterations and a Hutchinson diagonal from ``probes`` Rademacher probes drawn
            from ``generator``; :mod:`hbmeta.inference.gauss_newton_cg`). ``cg`` gives mean-field or point-mass posteriors
            and no linearised posterior.
        variance: the mean-field guide's variances: ``"meanfield"`` (the KL(q || p)-optimal
            :math:`1 / \mathrm{diag}(\Lambda_0 + G^\top G)`, the default) or ``"marginal"`` (the linearised
            posterior's exact marginals :math:`\mathrm{diag}(\Lambda_0 + G^\top G)^{-1}`, Woodbury only).
        curvature: where a mean-field step takes the likelihood's gradient and Hessian in the outputs: at the mean
            (``"mean"``: Gauss-Newton, the linearised model's Laplace step) or averaged over the posterior's current
            spread in function space (``"expected"``, ``num_draws`` quasi-Monte-Carlo draws per point: the Gaussian-VI
            step of the Bayesian learning rule, whose fixed point is the mean-field ELBO's optimum for a model linear in
            its weights). The two agree for a Gaussian likelihood; for a softmax the Laplace step's curvature vanishes
            wherever the support set is fitted confidently, which leaves the posterior as wide as the prior there
            and its predictive far too uncertain (README, "Omniglot"). With ``"expected"`` the line search scores the
            objective with the same draws (the part of the negative ELBO the mean moves). Point-mass and full
            posteriors, and the ``cg`` solver, take ``"mean"``.
        tolerance: stop after a step in which every task converged: its objective fell by at most
            ``tolerance * max(1, |objective|)``, and, if no candidate step helped it, it had also converged in the
            step before (one rejection may only mean that the full step was too long). The remaining callbacks see
            the final posterior. ``0`` runs all ``steps``.
        first: :func:`gauss_newton_linearise` at ``start.loc`` (with the prior's variances, ``start``'s scales as the
            spread and ``num_draws``), if it is known already: the first step starts from it
            (:func:`gauss_newton_fit_pair`). Woodbury only.
    """
    if variance not in ("meanfield", "marginal") or (variance == "marginal" and solver != "woodbury"):
        raise ValueError(f"variance={variance!r}: choose 'meanfield', or 'marginal' with the woodbury solver")
    if solver not in ("woodbury", "cg"):
        raise ValueError(f"unknown Gauss-Newton solver {solver!r}; choose 'woodbury' or 'cg'")
    if solver == "cg" and kind == "full":
        raise ValueError("the matrix-free Gauss-Newton solver gives mean-field or point-mass posteriors, not full ones")
    if curvature not in CURVATURES:
        raise ValueError(f"curvature={curvature!r}: choose one of {', '.join(CURVATURES)}")
    if first is not None and solver != "woodbury":
        raise ValueError("a precomputed first linearisation is for the woodbury solver")
    m = start.loc.detach().clone()
    prior_var = prior_var.detach().expand_as(m)
    scale = _spread_scale(model, start, prior_var, kind, solver, curvature, num_draws)
    expected = scale is not None
    prior_loc = prior_loc.detach()
    candidates = 0.5 ** torch.arange(halvings + 1, dtype=m.dtype, device=m.device)
    reach = torch.ones(m.shape[0], dtype=m.dtype, device=m.device)  # per task: the largest step it will try next
    posterior = start.detach()
    small_before = torch.zeros(m.shape[0], dtype=torch.bool, device=m.device)
    with torch.no_grad():
        current = map_objective(model, m, x, y, prior_loc, prior_var) if solver == "cg" else None
        if callback is not None:
            callback(0, posterior)
        for step in range(1, steps + 1):
            if solver == "cg":
                direction, diagonal = cg_direction(model, m, x, y, prior_loc, prior_var, cg_steps, probes, generator)
            else:
                direction, scaled, chol, f, spread = gauss_newton_direction(
                    model, m, x, y, prior_loc, prior_var, scale, num_draws if expected else 0, first if step == 1 else None)
                if current is None or spread is not None:  # the objective at m, from the Jacobian pass's outputs
                    shifted = f if spread is None else f.unsqueeze(0) + spread.reshape(spread.shape[0], *f.shape)
                    fit = model.likelihood.log_prob(shifted, y)
                    current = -(fit if spread is None else fit.mean(0)) + 0.5 * ((m - prior_loc).square()
                                                                                / prior_var).sum(-1)
            if not torch.isfinite(direction.sum()):
                bad = (~torch.isfinite(direction).all(1)).nonzero().flatten().tolist()
                raise InnerLoopDivergedError(f"Gauss-Newton inner update produced NaN/inf at step {step} of {steps} "
                                             f"for task(s) {bad}; check the data and the prior scale")
            before = current
            m, current, reach = _line_search(model, m, direction, reach, current, candidates, x, y, prior_loc,
                                             prior_var, spread if solver != "cg" else None)
            if expected:  # the next step's spread comes from this step's variances
                scale = _posterior("meanfield", m, prior_var, scaled, chol, False, variance).scale
            done = step == steps
            if tolerance > 0:
                small = (before - current) <= tolerance * current.abs().clamp_min(1.0)
                done = done or bool((small & ((reach == 1) | small_before)).all())
                small_before = small
            if (done or callback is not None) and solver == "cg":
                posterior = Posterior(m) if kind == "delta" else Posterior(m, (1.0 / (1.0 / prior_var + diagonal)).sqrt())
            elif done or callback is not None:
                posterior = _posterior(kind, m, prior_var, scaled, chol, laplace, variance)
            if callback is not None:
                for later in range(step, steps + 1 if done else step + 1):  # converged: the rest see the same
                    callback(later, posterior)
            if done:
                break
    return posterior


def _spread_scale(model: HierarchicalModel, start: Posterior, prior_var: Tensor, kind: str, solver: str,
                  curvature: str, num_draws: int) -> Tensor | None:
    """The scales whose function-space spread the first step averages the curvature over (``curvature="expected"``
    for a likelihood that is not quadratic, mean-field Woodbury fits), else ``None``."""
    if not (curvature == "expected" and kind == "meanfield" and solver == "woodbury" and num_draws > 0
            and not model.likelihood.quadratic):
        return None
    return start.scale.detach() if start.kind == "meanfield" else prior_var.sqrt()


def gauss_newton_fit_pair(model: HierarchicalModel, x: Tensor, y: Tensor, leading: int, start: Posterior,
                          prior_loc: Tensor, prior_var: Tensor, steps: int, all_steps: int | None = None,
                          kind: str = "meanfield", leading_laplace: bool = False, solver: str = "woodbury",
                          curvature: str = "expected", num_draws: int = 64, **settings
                          ) -> tuple[Posterior, Posterior]:
    r"""Gauss-Newton VI on the first ``leading`` points of every task and on all of them, both from ``start`` under
    the same prior: GEM-BML+'s ``q1 = VI(Theta, D_tr)`` and, in restart mode, ``q2 = VI(Theta, D_tr u D_val)`` with
    ``x = [x_tr, x_val]``.

    Both first steps linearise the network at ``start.loc``, so the all-points fit's Jacobian, kernel and outputs
    contain the leading fit's as leading rows (:meth:`Linearisation.leading`): one Jacobian pass and one kernel serve
    both. Otherwise the two fits are :func:`gauss_newton_fit` with ``steps`` / ``all_steps`` steps and ``settings``;
    only the leading fit keeps the linearised posterior (``leading_laplace``). A likelihood whose curvature factor is
    a matrix (softmax) shares nothing beyond the outputs, and the leading fit runs on its own.
    """
    all_steps = steps if all_steps is None else all_steps
    settings.update(solver=solver, curvature=curvature, num_draws=num_draws)
    first = None
    if solver == "woodbury" and steps > 0 and all_steps > 0:
        with torch.no_grad():
            scale = _spread_scale(model, start, prior_var.detach().expand_as(start.loc), kind, solver, curvature,
                                  num_draws)
            first = gauss_newton_linearise(model, start.loc.detach(), x, y, prior_var.detach(), scale,
                                           num_draws if scale is not None else 0)
    leading_first = first.leading(leading) if first is not None and first.white is not None else None
    q1 = gauss_newton_fit(model, x[:, :leading].contiguous(), y[:, :leading].contiguous(), start, prior_loc,
                          prior_var, steps, kind, laplace=leading_laplace, first=leading_first, **settings)
    q2 = gauss_newton_fit(model, x, y, start, prior_loc, prior_var, all_steps, kind, first=first, **settings)
    return q1, q2


def _line_search(model: HierarchicalModel, m: Tensor, direction: Tensor, reach: Tensor, current: Tensor,
                 candidates: Tensor, x: Tensor, y: Tensor, prior_loc: Tensor, prior_var: Tensor,
                 spread: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per task, the largest step ``reach * candidates[j]`` along ``direction`` that lowers the MAP objective (with
    ``spread``: its average over the posterior's spread, :func:`map_objective`).

    Every candidate of every task is scored in ONE batched forward pass (``[H, T, P]`` weights: no per-task indexing,
    no host synchronisation; the prior term from :func:`prior_term_along`). Scoring the full steps first and the
    shorter ones only where needed was measured slower: in a sinusoid meta-batch of 25 tasks some task rejects its
    full step in almost every Gauss-Newton step, so it costs two passes. Returns the new means, objectives and
    reaches (1 after a step was taken; half the shortest tried where none helped and the task stayed).
    """
    tried = reach.unsqueeze(0) * candidates.unsqueeze(1)                               # [H, T]
    trial = torch.addcmul(m, tried.unsqueeze(-1), direction)                            # [H, T, P]
    scores = map_objective(model, trial, x, y, prior_loc, prior_var, spread,
                           prior_term=prior_term_along(m, direction, prior_loc, prior_var, tried))  # [H, T]
    better = (scores < current) & torch.isfinite(scores)
    found = better.any(0)
    best = better.to(torch.int8).argmax(0, keepdim=True)                                # the largest that helps
    taken = torch.where(found, tried.gather(0, best).squeeze(0), 0.0)                   # 0 where none helped
    m = torch.addcmul(m, taken.unsqueeze(-1), direction)                                # = trial[best] (the same op)
    current = torch.where(found, scores.gather(0, best).squeeze(0), current)
    reach = torch.where(found, 1.0, tried[-1] / 2)
    return m, current, reach


def prior_term_along(m: Tensor, direction: Tensor, prior_loc: Tensor, prior_var: Tensor, steps: Tensor) -> Tensor:
    r"""The prior term of :func:`map_objective` at ``m + t d`` for every step ``t`` of ``steps [H, T]``, from three
    reductions over ``[T, P]`` instead of one over ``[H, T, P]``: with :math:`\delta = m - \mu_0`,
    :math:`\tfrac12 \sum (\delta + t d)^2 / v_0 = a + t b + t^2 c`."""
    delta = m - prior_loc
    scaled = direction / prior_var
    a = 0.5 * (delta.square() / prior_var).sum(-1)
    b = (delta * scaled).sum(-1)
    c = 0.5 * (direction * scaled).sum(-1)
    return a + steps * b + steps.square() * c


def _posterior(kind: str, m: Tensor, prior_var: Tensor, scaled: Tensor, chol: Tensor, laplace: bool,
               variance: str = "meanfield") -> Posterior:
    r"""The posterior of the step: the guide's family, and on request the linearised model's full Gaussian.

    The full covariance is :math:`(\Lambda_0 + G^\top G)^{-1} = \Sigma_0 - U U^\top` with
    :math:`U = \Sigma_0^{1/2} (L^{-1} G \Sigma_0^{1/2})^\top`, ``L L^T = I + G Sigma0 G^T`` (Woodbury).
    """
    if kind == "delta":
        return Posterior(m)
    prior_sd = prior_var.sqrt()
    if kind == "full" or laplace or variance == "marginal":
        factor = prior_sd.unsqueeze(-1) * torch.linalg.solve_triangular(
            chol, scaled.to(chol.dtype), upper=False).transpose(1, 2).to(scaled.dtype)
    if kind == "full":  # P x P per task: small models only
        cov = torch.diag_embed(prior_var) - factor @ factor.transpose(1, 2)
        return Posterior(m, scale_tril=torch.linalg.cholesky(cov))
    if variance == "marginal":                                   # diag (Sigma0 - U U^T)
        scale = (prior_var - factor.square().sum(-1)).clamp_min(1e-30).sqrt()
    else:
        curvature = scaled.square().sum(1) / prior_var             # diag G^T G
        scale = (1.0 / (1.0 / prior_var + curvature)).sqrt()
    if laplace:
        return Posterior(m, scale, laplace_scale=prior_sd, laplace_factor=factor)
    return Posterior(m, scale)
