r"""Meta-gradient estimation error of GEM vs the ELBO gradient (GEM-BML appendix C.1, Figure 1).

Bayesian linear regression (DESIGN.md, "An exact oracle"): ``y = X theta + eps``, ``eps ~ N(0, s^2 I)``,
``theta ~ N(mu, diag sigma^2)``. The true meta-gradient is autograd of the exact log marginal likelihood

.. math:: g = \nabla_{(\mu, \log\sigma)} \log N(y;\ X\mu,\ X \Sigma X^\top + s^2 I) .

Both estimators start from ``q_0 = N(mu, diag sigma^2)`` and run the SAME inner trajectory: ``K`` steps of
plain SGD (learning rate ``lr``, ``num_samples`` reparameterised draws per step, analytic KL) on the
negative ELBO, fed identical noise, so they see the same ``lambda_K`` and differ only in the meta-gradient:

- **GEM** (section 3.2, Theorem 1; closed form of appendix B.7): ``E_{q_K} grad log p(theta; Theta)``,
  i.e. ``d/dmu = (m - mu)/sigma^2``, ``d/dlog sigma = (v + (m - mu)^2)/sigma^2 - 1``, computed by
  :meth:`DiagonalGaussianPrior.gem_gradient` on the posterior that :func:`hbmeta.inference.inner.fit_posterior` returns;
- **ELBO** gradient (eq. 4, Amortized BML): ``d/dTheta ELBO(lambda_K(Theta); Theta)`` with the SGD steps
  unrolled (``create_graph``), the final ELBO estimated with ``num_samples`` fresh draws. This is the
  computation of :func:`hbmeta.inference.elbo_gradient.elbo_gradient`, re-written here so that it gives per-run
  gradients (each run has its own prior, passed to the model as a ``[R]``-batched prior) at every
  ``K`` of one unroll, and so that it also runs with the full-covariance guide (the library function
  accepts only meanfield / delta guides).

Error = ``||g_hat - g|| / ||g||`` over the concatenated ``(mu, log sigma)`` gradient, per run. Runs are
batched as the tasks of one plate (tasks are independent, so this is ``R`` independent runs). With the
full-covariance guide VI can reach the exact posterior, so GEM's error goes to the SGD noise floor; with
the mean-field guide both estimators keep the bias of the mean-field posterior (bounded as in appendix A.3;
small here, the features being independent). The ELBO gradient ``= GEM + (d lambda_K / d Theta)^T d ELBO /
d lambda`` keeps a larger floor: ``d lambda_K / d Theta`` tends to ``d lambda* / d Theta != 0`` and the
Monte-Carlo ``d ELBO / d lambda`` is noisy even at the optimum. Default config: ~3 s on 2 CPU cores.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from hbmeta.inference.inner import InnerConfig, fit_posterior, negative_elbo
from hbmeta.models.guides import MeanFieldGuide, make_guide
from hbmeta.models.hierarchical import HierarchicalModel
from hbmeta.models.likelihoods import GaussianLikelihood
from hbmeta.models.linear import exact_log_marginal, linear_network
from hbmeta.models.posterior import Posterior
from hbmeta.models.priors import DiagonalGaussianPrior

__all__ = ["GradientStudyConfig", "run_gradient_study", "format_table", "plot_gradient_study", "write_gradient_study"]

DTYPE = torch.float64
ESTIMATORS = ("GEM", "ELBO", "iBaML")
#: estimators per guide: iBaML's implicit gradient is for the mean-field guide
GUIDE_ESTIMATORS = {"meanfield": ESTIMATORS, "fullcov": ("GEM", "ELBO")}
#: query points per run for iBaML's meta-loss (the study's other estimators use the support set alone)
QUERY_POINTS = 10


@dataclass
class GradientStudyConfig:
    """Settings of the study. Data per run: ``X ~ N(0, 1)``, ``theta* ~ N(0, I)``, ``y = X theta* + s eps``;
    prior ``mu ~ N(0, I)``, ``log sigma ~ U(-0.5, 0.5)`` (so the true gradient is away from zero).

    ``lr`` must keep the unrolled SGD stable, ``lr * lambda_max(S^-1) < 2`` with ``S^-1 = Sigma^-1 + X^T X / s^2``
    (checked; with the defaults ``lambda_max`` is 2-32), and ``1 / lr`` sets how fast the log-scales converge.
    """

    num_features: int = 4
    num_points: int = 10
    noise_scale: float = 1.0
    iterations: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100, 200)
    repeats: int = 100
    lr: float = 0.02
    num_samples: int = 16
    seed: int = 0
    guides: tuple[str, ...] = ("meanfield", "fullcov")

    @classmethod
    def quick(cls, **overrides) -> "GradientStudyConfig":
        """A tiny variant for tests (a few seconds)."""
        return cls(**{"iterations": (1, 10, 100), "repeats": 4, **overrides})


def _problems(config: GradientStudyConfig) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``x [R, N, d]``, ``y [R, N, 1]``, prior ``mu [R, d]`` and ``log_sigma [R, d]`` of the ``R`` runs, and each
    run's query set ``x_query [R, Q, d]``, ``y_query [R, Q, 1]`` for iBaML's meta-loss (the same ``theta*``, inputs and
    noise from a stream of their own, so the support problems are those of the study without iBaML)."""
    g = torch.Generator().manual_seed(config.seed)
    r, n, d = config.repeats, config.num_points, config.num_features
    x = torch.randn(r, n, d, generator=g, dtype=DTYPE)
    theta = torch.randn(r, d, 1, generator=g, dtype=DTYPE)
    y = x @ theta + config.noise_scale * torch.randn(r, n, 1, generator=g, dtype=DTYPE)
    mu = torch.randn(r, d, generator=g, dtype=DTYPE)
    log_sigma = torch.rand(r, d, generator=g, dtype=DTYPE) - 0.5
    q = torch.Generator().manual_seed(config.seed + 7)
    xq = torch.randn(r, QUERY_POINTS, d, generator=q, dtype=DTYPE)
    yq = xq @ theta + config.noise_scale * torch.randn(r, QUERY_POINTS, 1, generator=q, dtype=DTYPE)
    return x, y, mu, log_sigma, xq, yq


def _exact_gradients(x: Tensor, y: Tensor, mu: Tensor, log_sigma: Tensor, noise_scale: float) -> Tensor:
    """The true meta-gradient of every run, ``[R, 2d]`` = autograd of :func:`exact_log_marginal`."""
    rows = []
    for t in range(x.shape[0]):
        m, ls = mu[t].clone().requires_grad_(), log_sigma[t].clone().requires_grad_()
        lml = exact_log_marginal(x[t:t + 1], y[t:t + 1], m, ls, noise_scale).sum()
        rows.append(torch.cat(torch.autograd.grad(lml, [m, ls])))
    return torch.stack(rows)


def _rel_error(estimate: Tensor, exact: Tensor) -> Tensor:
    return (estimate - exact).norm(dim=-1) / exact.norm(dim=-1)


def _gem_estimates(model, guide, x, y, mu, log_sigma, config, noise: Tensor) -> dict[int, Tensor]:
    """GEM after each ``K``: VI by :func:`fit_posterior` (SGD, the given noise), closed-form GEM per run."""
    snapshots: dict[int, Posterior] = {}
    keep = set(config.iterations)
    inner = InnerConfig(steps=max(keep), lr=config.lr, optimizer="sgd", num_samples=config.num_samples,
                        estimator="reparam")  # the study feeds both estimators the same weight-space noise
    fit_posterior(model, guide, x, y, Posterior(mu, log_sigma.exp()), prior=dist.Normal(mu, log_sigma.exp()).to_event(1),
                  config=inner, noise=lambda step, shape: noise[step - 1],
                  callback=lambda step, post: snapshots.__setitem__(step, post) if step in keep else None)
    priors = [DiagonalGaussianPrior(mu[t], log_sigma[t]) for t in range(x.shape[0])]
    out = {}
    for k, post in snapshots.items():
        grads = [priors[t].gem_gradient(post.select(t)) for t in range(x.shape[0])]
        out[k] = torch.stack([torch.cat([g["mu"][0], g["log_sigma"][0]]) for g in grads])
    return out


def _elbo_estimates(model, guide, x, y, mu, log_sigma, config, noise: Tensor, gen: torch.Generator) -> dict[int, Tensor]:
    r"""ELBO gradient after each ``K`` from ONE unroll: ``lambda_{k+1} = lambda_k - lr * grad(-ELBO)`` with
    ``create_graph``; at each requested ``K``, ``grad_{mu, log sigma} ELBO(lambda_K(Theta); Theta)`` per run."""
    mu, log_sigma = mu.clone().requires_grad_(), log_sigma.clone().requires_grad_()
    prior = dist.Normal(mu, log_sigma.exp()).to_event(1)
    loc, log_scale = mu.clone(), log_sigma.clone()  # start at the prior; non-leaf, so d/dlambda excludes the prior
    params = {"loc": loc, "log_scale": log_scale} if guide.name == "meanfield" else {
        "loc": loc, "tril": torch.zeros(*mu.shape, mu.shape[-1], dtype=DTYPE, requires_grad=True), "log_diag": log_scale}
    out = {}
    for k in range(1, max(config.iterations) + 1):
        loss = negative_elbo(model, guide, params, x, y, prior, noise[k - 1])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {n: p - config.lr * g for (n, p), g in zip(params.items(), grads)}
        if k in config.iterations:
            eps = torch.randn(noise.shape[1:], generator=gen, dtype=DTYPE)
            elbo = -negative_elbo(model, guide, params, x, y, prior, eps)
            out[k] = torch.cat(torch.autograd.grad(elbo, [mu, log_sigma], retain_graph=True), -1).detach()
    return out


def _query_nll_at_mean(m: Tensor, x: Tensor, y: Tensor, noise_scale: float) -> Tensor:
    """``-log N(y; x m, s^2)`` summed over each run's points ``[R]``: iBaML's meta-loss at the posterior mean."""
    residual = y[..., 0] - torch.einsum("rnd,rd->rn", x, m)
    return 0.5 * (residual / noise_scale).pow(2).sum(-1)


def _exact_ibaml_gradients(x, y, xq, yq, mu, log_sigma, noise_scale: float) -> Tensor:
    """The exact gradient of iBaML's meta-loss ``[R, 2d]``: the query NLL at the mean-field optimum's mean
    ``m* = Lambda^-1 (X^T y / s^2 + mu / sigma^2)`` (the posterior mean, exact for this model), by autograd."""
    mu, log_sigma = mu.clone().requires_grad_(), log_sigma.clone().requires_grad_()
    inv_var = torch.exp(-2 * log_sigma)
    precision = x.transpose(-1, -2) @ x / noise_scale**2 + torch.diag_embed(inv_var)
    rhs = (x.transpose(-1, -2) @ y)[..., 0] / noise_scale**2 + mu * inv_var
    m = torch.linalg.solve(precision, rhs.unsqueeze(-1))[..., 0]
    return torch.cat(torch.autograd.grad(_query_nll_at_mean(m, xq, yq, noise_scale).sum(), [mu, log_sigma]), -1)


def _ibaml_estimates(model, guide, x, y, xq, yq, mu, log_sigma, config, noise: Tensor) -> dict[int, Tensor]:
    """iBaML after each ``K``: the implicit gradient (:func:`hbmeta.inference.ibaml.vi_implicit_gradient`, its default
    expectation at the mean, an exact CG solve) at the SAME inner SGD trajectory's ``lambda_K`` as GEM's."""
    from hbmeta.inference.ibaml import vi_implicit_gradient
    from hbmeta.inference.inner import diagonal_kl

    snapshots: dict[int, Posterior] = {}
    keep = set(config.iterations)
    inner = InnerConfig(steps=max(keep), lr=config.lr, optimizer="sgd", num_samples=config.num_samples,
                        estimator="reparam")
    fit_posterior(model, guide, x, y, Posterior(mu, log_sigma.exp()), prior=dist.Normal(mu, log_sigma.exp()).to_event(1),
                  config=inner, noise=lambda step, shape: noise[step - 1],
                  callback=lambda step, post: snapshots.__setitem__(step, post) if step in keep else None)
    hyper_mu, hyper_ls = mu.clone().requires_grad_(), log_sigma.clone().requires_grad_()
    s = config.noise_scale

    def objective(lam: Tensor) -> Tensor:
        m, rho = lam.chunk(2, -1)
        return (diagonal_kl(m, rho, hyper_mu, hyper_ls.exp()) + _query_nll_at_mean(m, x, y, s)).sum()

    out = {}
    for k, post in snapshots.items():
        grads, _ = vi_implicit_gradient(objective, lambda lam: _query_nll_at_mean(lam.chunk(2, -1)[0], xq, yq, s).sum(),
                                        torch.cat([post.loc, post.scale.log()], -1), [hyper_mu, hyper_ls],
                                        cg_steps=4 * mu.shape[-1])
        out[k] = torch.cat(grads, -1)
    return out


def _summary(errors: Tensor) -> dict[str, float]:
    q = torch.quantile(errors, torch.tensor([0.1, 0.5, 0.9], dtype=DTYPE))
    return {"mean": errors.mean().item(), "std": errors.std().item() if errors.numel() > 1 else 0.0,
            "q10": q[0].item(), "median": q[1].item(), "q90": q[2].item()}


def run_gradient_study(config: GradientStudyConfig | None = None) -> dict:
    """Run the study; returns ``{"config", "rows": [{guide, estimator, K, mean, std, q10, median, q90}],
    "errors": {guide: {estimator: {K: [R errors]}}}, "seconds"}`` (JSON-serialisable)."""
    config = GradientStudyConfig() if config is None else config
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: intra-op threads cost more than they save (and stall on a busy machine)
    try:
        return _run(config)
    finally:
        torch.set_num_threads(threads)


def _run(config: GradientStudyConfig) -> dict:
    start = time.perf_counter()
    if not set(config.guides) <= {"meanfield", "fullcov"}:
        raise ValueError(f"the study supports the 'meanfield' and 'fullcov' guides; got {config.guides}")
    x, y, mu, log_sigma, xq, yq = _problems(config)
    precision = torch.diag_embed(torch.exp(-2 * log_sigma)) + x.transpose(-1, -2) @ x / config.noise_scale**2
    lam_max = torch.linalg.eigvalsh(precision).max().item()
    if config.lr * lam_max >= 2:
        raise ValueError(f"lr={config.lr} makes the unrolled SGD unstable: lr * lambda_max = {config.lr * lam_max:.2f} >= 2")
    exact = _exact_gradients(x, y, mu, log_sigma, config.noise_scale)
    exact_ibaml = _exact_ibaml_gradients(x, y, xq, yq, mu, log_sigma, config.noise_scale)
    model = HierarchicalModel(nn.Sequential(linear_network(config.num_features)),
                              DiagonalGaussianPrior(torch.zeros(config.num_features, dtype=DTYPE)),
                              GaussianLikelihood(config.noise_scale))
    rows, errors = [], {}
    for i, name in enumerate(config.guides):
        # plain (m, log s) coordinates for both estimators: the same SGD trajectory, and the stability check above holds
        guide = MeanFieldGuide(whiten=False) if name == "meanfield" else make_guide(name)
        gen = torch.Generator().manual_seed(config.seed + 1000 * (i + 1))
        noise = torch.randn(max(config.iterations), config.num_samples, *mu.shape, generator=gen, dtype=DTYPE)
        estimates = {"GEM": _gem_estimates(model, guide, x, y, mu, log_sigma, config, noise),
                     "ELBO": _elbo_estimates(model, guide, x, y, mu, log_sigma, config, noise, gen)}
        if "iBaML" in GUIDE_ESTIMATORS[name]:
            estimates["iBaML"] = _ibaml_estimates(model, guide, x, y, xq, yq, mu, log_sigma, config, noise)
        errors[name] = {}
        for est in GUIDE_ESTIMATORS[name]:
            target = exact_ibaml if est == "iBaML" else exact
            errors[name][est] = {k: _rel_error(estimates[est][k], target) for k in config.iterations}
            rows += [{"guide": name, "estimator": est, "K": k, **_summary(e)} for k, e in errors[name][est].items()]
            errors[name][est] = {k: e.tolist() for k, e in errors[name][est].items()}
    return {"config": asdict(config), "rows": rows, "errors": errors, "seconds": time.perf_counter() - start}


def format_table(result: dict) -> str:
    """Markdown table: one row per ``K``, one column per guide x estimator, ``mean ± std (median)``."""
    cols = [(g, e) for g in result["config"]["guides"] for e in GUIDE_ESTIMATORS[g]]
    lines = ["| K | " + " | ".join(f"{g} {e}" for g, e in cols) + " |", "|---:|" + "---:|" * len(cols)]
    cell = {(r["guide"], r["estimator"], r["K"]): r for r in result["rows"]}
    for k in result["config"]["iterations"]:
        vals = [cell[(g, e, k)] for g, e in cols]
        lines.append(f"| {k} | " + " | ".join(f"{v['mean']:.3g} ± {v['std']:.2g} ({v['median']:.3g})" for v in vals) + " |")
    c = result["config"]
    lines.append(f"\nRelative error ||g_hat - g|| / ||g|| of the (mu, log sigma) meta-gradient, mean ± std (median) "
                 f"over {c['repeats']} runs; d={c['num_features']}, N={c['num_points']}, s={c['noise_scale']}; inner SGD "
                 f"lr={c['lr']}, {c['num_samples']} samples/step, the same trajectory for every estimator. GEM and ELBO "
                 f"estimate the gradient of log p(D; Theta); iBaML the gradient of its own meta-loss, the NLL of "
                 f"{QUERY_POINTS} query points at the posterior mean.")
    return "\n".join(lines)


def plot_gradient_study(result: dict, path: str | Path) -> Path:
    """Log-log error vs ``K``: median per guide x estimator (colour: guide; solid GEM, dashed ELBO), 10-90% band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(6.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, g in enumerate(result["config"]["guides"]):
        for e in GUIDE_ESTIMATORS[g]:
            rows = [r for r in result["rows"] if r["guide"] == g and r["estimator"] == e]
            ks, color = [r["K"] for r in rows], ("C0", "C3", "C2", "C1")[i % 4]
            style = {"GEM": ("o", "-"), "ELBO": ("s", "--"), "iBaML": ("^", ":")}[e]
            ax.plot(ks, [r["median"] for r in rows], color=color, marker=style[0], ls=style[1], label=f"{g} {e} (median)")
            ax.fill_between(ks, [r["q10"] for r in rows], [r["q90"] for r in rows], color=color, alpha=0.12)
    ax.set(xscale="log", yscale="log", xlabel="inner iterations K", ylabel="relative error of meta-gradient",
           title="Meta-gradient error, Bayesian linear regression (GEM-BML C.1)")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def write_gradient_study(result: dict, out_dir: str | Path) -> Path:
    """Write ``gradient_study.json`` and ``gradient_study.png`` into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gradient_study.json").write_text(json.dumps(result, indent=2))
    plot_gradient_study(result, out / "gradient_study.png")
    return out
