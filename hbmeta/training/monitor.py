r"""What a meta-training run logs besides its gradient: how well the current prior adapts, and where it stands.

Every ``log_every`` iterations :func:`adaptation_metrics` adapts the current prior to a fresh meta-batch of
training tasks (drawn from its own random stream, so the run's parameters and resume are unchanged) with the
run's inner update and reports, averaged over the tasks:

- ``support_nll`` / ``query_nll``: the expected negative log-likelihood per point under the adapted posterior,
  :math:`-\frac1N E_q \log p(D \mid \theta)`, on the support set the posterior was fitted to and on the query set;
- ``kl``: :math:`\mathrm{KL}(q \,\|\, p(\theta; \Theta))` per task (a Bayesian algorithm with the diagonal Gaussian
  prior and a mean-field or Delta posterior; otherwise left out), so the inner ELBO on the support set is
  ``inner_elbo = -(N support_nll + kl)``;
- ``query_loss``: the likelihood's point loss (MSE for regression, cross-entropy for classification) of the
  predictive mean, and ``query_accuracy`` for classification;
- :func:`hbmeta.inference.metrics.prior_scale_statistics`: the prior's scale, ``prior_scale`` (mean) and its
  min / median / max (``MetaLearner.meta_step`` returns them too, beside its meta-batch's own adaptation numbers).

:class:`MetricsLog` writes each record to ``metrics.jsonl`` and, with ``--tensorboard``, to TensorBoard event files in
``RUN/tensorboard`` (the ``tensorboard`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.inner import diagonal_kl
from hbmeta.inference.learner import MetaLearner
from hbmeta.models.likelihoods import CategoricalLikelihood
from hbmeta.models.priors import DiagonalGaussianPrior

__all__ = ["adaptation_metrics", "monitor_generator", "MetricsLog"]

#: posterior draws for the expected log-likelihood (the predictive mean after Gauss-Newton VI is exact)
MONITOR_SAMPLES = 8


def monitor_generator(seed: int, iteration: int) -> torch.Generator:
    """The random stream of the monitoring batch of ``iteration``: apart from the training streams
    (:func:`hbmeta.training.runs.iteration_generators`), which it never touches."""
    return torch.Generator().manual_seed((seed * 1_000_003 + iteration) * 2 + 7_919_000_000)


def _expected_nll_per_point(learner: MetaLearner, posterior, x, y, generator) -> torch.Tensor:
    pred = learner.predict(posterior, x, MONITOR_SAMPLES, generator)
    f = pred.samples
    points = y.shape[1]
    return -pred.likelihood.log_prob(f, y.expand(f.shape[0], *y.shape)).mean(0) / points, pred  # [T]


def adaptation_metrics(learner: MetaLearner, batch: TaskBatch, generator: torch.Generator) -> dict[str, float]:
    """Adapt ``learner``'s prior to ``batch``'s support sets with its inner update; the numbers in the module
    docstring, averaged over the tasks (the learner itself is not changed)."""
    batch = batch.to(learner.device)
    noise = torch.Generator(device=learner.device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    posterior = learner.adapt(batch.x_train, batch.y_train, generator=noise)
    with torch.no_grad():
        support_nll, _ = _expected_nll_per_point(learner, posterior, batch.x_train, batch.y_train, noise)
        query_nll, pred = _expected_nll_per_point(learner, posterior, batch.x_val, batch.y_val, noise)
        out = {"support_nll": float(support_nll.mean()), "query_nll": float(query_nll.mean())}
        if isinstance(learner.likelihood, CategoricalLikelihood):
            probs = torch.softmax(pred.samples, dim=-1).mean(0)
            out["query_loss"] = float(-probs.clamp_min(1e-12).log().gather(-1, batch.y_val.unsqueeze(-1)).mean())
            out["query_accuracy"] = float((probs.argmax(-1) == batch.y_val).float().mean())
        else:
            out["query_loss"] = float(pred.likelihood.point_loss(pred.mean, batch.y_val).mean())
        prior = learner.prior
        if learner.spec.bayesian and isinstance(prior, DiagonalGaussianPrior) and posterior.kind in ("meanfield", "delta"):
            log_s = None if posterior.kind == "delta" else posterior.scale.log()
            kl = diagonal_kl(posterior.loc, log_s, prior.loc.detach(), prior.scale.detach())
            out["kl"] = float(kl.mean())
            out["inner_elbo"] = float((-(support_nll * batch.x_train.shape[1]) - kl).mean())
    return out


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged iteration) and, if asked, TensorBoard scalars beside it."""

    def __init__(self, run_dir: Path, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self.path.open("a")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover - depends on the installed extras
                raise RuntimeError("--tensorboard needs the tensorboard package: pip install 'hbmeta[tensorboard]'") from None
            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            step = record["iteration"]
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
