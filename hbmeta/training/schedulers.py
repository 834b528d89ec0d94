r"""Task schedulers: which tasks of a candidate pool a meta-iteration trains on (ATS, Yao et al. 2021).

At each meta-iteration a pool of :math:`N^{pool}` candidate tasks is drawn; a scheduler gives them sampling
probabilities :math:`w_i` and :math:`B` tasks are drawn from the pool *without replacement*
(Plackett-Luce: sequentially, each time from the renormalised remaining probabilities, done here with the
Gumbel-top-k trick). The meta-model is updated on them with any meta-learner (GEM-BML+, MAML, Reptile, ...).

- :class:`UniformScheduler`: :math:`w_i = 1/N^{pool}` (the usual meta-training when the pool is the batch).
- :class:`GreedyLossScheduler`: :math:`w \propto \exp(\ell_i / T)` with :math:`\ell_i` the query loss after
  adaptation (hardest tasks first; a simple non-learned reference).
- :class:`AdaptiveTaskScheduler` (ATS): :math:`w = \phi(\text{features}, \text{progress})`, the network
  :class:`hbmeta.models.scheduler_net.SchedulerNet`, trained by REINFORCE: reward = the decrease of the loss on
  held-out clean validation tasks caused by the meta-update on the sampled tasks, minus a moving-average
  baseline (normalised by a moving standard deviation),
  :math:`\nabla_\phi J \approx (r - b)\,\nabla_\phi \log P_\phi(i_1, \dots, i_B)`.

Features of candidate ``i`` (:func:`task_features`): its query loss after adaptation, the cosine similarity
between the gradients of its support and query losses, and the support gradient norm. For GEM (Bayesian)
learners the task is adapted by the inner VI and the losses and gradients are taken at the adapted
posterior's **mean** :math:`m_i` (the conventional loss ``point_loss`` of the likelihood: cross entropy /
MSE); for MAML / Reptile (point estimates) at the adapted weights :math:`\theta_i`. Losses and gradient norms
are standardised within the pool before they reach :math:`\phi`.

Proposition 1 of [1] (appendix A.1) relates the weighted to the uniform meta-loss,
:math:`\mathcal{L}^w = \mathcal{L} + \mathrm{Cov}(\mathcal{L}_{\theta_0}, w) - \alpha\,\mathrm{Cov}(\nabla_{\theta_0}, w)`
(:func:`weighted_loss_decomposition`).

References:
    [1] Yao, H., Wang, Y., Wei, Y., Zhao, P., Mahdavi, M., Lian, D. & Finn, C. Meta-learning with an
        Adaptive Task Scheduler. NeurIPS 2021.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import Tensor

from hbmeta.inference.batch import TaskBatch
from hbmeta.models.scheduler_net import SchedulerNet

__all__ = [
    "SCHEDULERS",
    "AdaptiveTaskScheduler",
    "GreedyLossScheduler",
    "Selection",
    "TaskScheduler",
    "UniformScheduler",
    "plackett_luce_log_prob",
    "sample_without_replacement",
    "scheduled_meta_step",
    "task_features",
    "validation_loss",
    "weighted_loss_decomposition",
]


class Selection(NamedTuple):
    """What a scheduler chose: ``indices [B]`` into the pool, ``probabilities [N]``, ``features [N, 3]`` or None."""

    indices: Tensor
    probabilities: Tensor
    features: Tensor | None


def sample_without_replacement(probabilities: Tensor, num: int, generator: torch.Generator | None = None) -> Tensor:
    """``num`` distinct indices drawn sequentially from ``probabilities [N]`` (Gumbel-top-k = Plackett-Luce)."""
    p = probabilities.detach().cpu().double()
    if p.dim() != 1 or not 1 <= num <= p.numel():
        raise ValueError(f"cannot draw {num} distinct tasks from a pool of {tuple(p.shape)} probabilities")
    if (p < 0).any() or not torch.isclose(p.sum(), torch.tensor(1.0, dtype=p.dtype), atol=1e-5):
        raise ValueError(f"probabilities must be non-negative and sum to 1; got sum {float(p.sum())}")
    gumbel = -torch.log(-torch.log(torch.rand(p.shape, generator=generator, dtype=p.dtype).clamp_min(1e-12)))
    return (p.log() + gumbel).topk(num).indices


def plackett_luce_log_prob(probabilities: Tensor, indices: Tensor) -> Tensor:
    r"""``log P(i_1, ..., i_B)`` of an ordered draw without replacement:
    :math:`\sum_k \log w_{i_k} - \log(1 - \sum_{j<k} w_{i_j})`. Differentiable in ``probabilities``."""
    chosen = probabilities[indices.to(probabilities.device)]
    taken = torch.cat([chosen.new_zeros(1), chosen.cumsum(0)[:-1]])
    return (chosen.clamp_min(1e-30).log() - (1 - taken).clamp_min(1e-30).log()).sum()


def weighted_loss_decomposition(losses: Tensor, grad_inner: Tensor, weights: Tensor, alpha: float) -> dict[str, Tensor]:
    r"""Proposition 1 of ATS (appendix A.1), with :math:`\mathrm{Cov}(a, w) = \sum_i (a_i - \bar a)(w_i - \bar w)`:

    .. math:: \mathcal{L}^w = \mathcal{L} + \mathrm{Cov}(\mathcal{L}_{\theta_0}, w) - \alpha\,\mathrm{Cov}(\nabla_{\theta_0}, w)

    where ``losses[i]`` :math:`= \mathcal{L}(D^q_i; \theta_0)`, ``grad_inner[i]`` :math:`= \langle\nabla
    \mathcal{L}(D^s_i; \theta_0), \nabla \mathcal{L}(D^q_i; \theta_0)\rangle`, the adapted losses are their
    first-order Taylor form :math:`\mathcal{L}_i - \alpha g_i` and :math:`\mathcal{L}` is the uniform mean
    of the adapted losses. Returns every term (``weighted`` = :math:`\sum_i w_i(\mathcal{L}_i - \alpha g_i)`).
    """
    adapted = losses - alpha * grad_inner
    cov_loss = ((losses - losses.mean()) * (weights - weights.mean())).sum()
    cov_grad = ((grad_inner - grad_inner.mean()) * (weights - weights.mean())).sum()
    return {"weighted": (weights * adapted).sum(), "uniform": adapted.mean(), "cov_loss": cov_loss,
            "cov_grad": cov_grad, "rhs": adapted.mean() + cov_loss - alpha * cov_grad}


def task_features(learner, pool: TaskBatch, generator: torch.Generator | None = None) -> Tensor:
    """``[N, 3]`` raw features per candidate: query loss after adaptation, cosine(support grad, query grad),
    support gradient norm, at the adapted posterior mean (GEM) or adapted weights (MAML / Reptile)."""
    pool = pool.to(learner.device)
    with torch.enable_grad():  # callers may hold no_grad; adaptation and the features need gradients
        posterior = learner.adapt(pool.x_train, pool.y_train, generator=generator)
        theta = posterior.loc.detach().requires_grad_()
        query = learner.model.point_loss(theta, pool.x_val, pool.y_val)    # [N]; tasks are independent, so the
        (g_query,) = torch.autograd.grad(query.sum(), theta)               # gradient of the sum is per task
        support = learner.model.point_loss(theta, pool.x_train, pool.y_train)
        (g_support,) = torch.autograd.grad(support.sum(), theta)
    cosine = torch.nn.functional.cosine_similarity(g_support, g_query, dim=-1, eps=1e-12)
    return torch.stack([query.detach(), cosine, g_support.norm(dim=-1)], -1).cpu()


def _standardise(features: Tensor) -> Tensor:
    """Query loss and log gradient norm as z-scores within the pool; the cosine as is."""
    def z(v: Tensor) -> Tensor:
        return (v - v.mean()) / (v.std(unbiased=False) + 1e-6)
    return torch.stack([z(features[:, 0]), features[:, 1], z(features[:, 2].clamp_min(1e-12).log())], -1)


def validation_loss(learner, batch: TaskBatch, seed: int = 0) -> float:
    """Mean query loss of ``batch`` after adaptation (at the posterior mean), with fixed inner-loop noise."""
    gen = torch.Generator(device=learner.device).manual_seed(seed)
    batch = batch.to(learner.device)
    with torch.enable_grad():
        posterior = learner.adapt(batch.x_train, batch.y_train, generator=gen)
    with torch.no_grad():
        return float(learner.model.point_loss(posterior.loc, batch.x_val, batch.y_val).mean())


class TaskScheduler:
    """Interface: :meth:`select` B of a pool, :meth:`observe` the meta-update, and persistable state."""

    name = "base"

    def select(self, learner, pool: TaskBatch, num: int, progress: float, generator: torch.Generator,
               noise_generator: torch.Generator | None = None) -> Selection:
        raise NotImplementedError

    def observe(self, learner) -> dict[str, float]:
        """Called after the meta-update on the selected tasks; returns numbers to log."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class UniformScheduler(TaskScheduler):
    """Every candidate equally likely."""

    name = "uniform"

    def select(self, learner, pool, num, progress, generator, noise_generator=None) -> Selection:
        probs = torch.full((pool.num_tasks,), 1.0 / pool.num_tasks)
        return Selection(sample_without_replacement(probs, num, generator), probs, None)


class GreedyLossScheduler(TaskScheduler):
    """``w = softmax(z(query loss) / temperature)``: prefers the tasks the meta-model adapts worst to."""

    name = "greedy"

    def __init__(self, temperature: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be positive; got {temperature}")
        self.temperature = temperature

    def select(self, learner, pool, num, progress, generator, noise_generator=None) -> Selection:
        features = task_features(learner, pool, noise_generator)
        probs = torch.softmax(_standardise(features)[:, 0] / self.temperature, 0)
        return Selection(sample_without_replacement(probs, num, generator), probs, features)


class AdaptiveTaskScheduler(TaskScheduler):
    """ATS: the neural scheduler :math:`\\phi` trained by REINFORCE on validation improvement.

    Args:
        validation: held-out clean validation tasks (a few; their loss defines the reward).
        temperature: softmax temperature (0.1 noisy tasks, 1 limited budgets in the paper).
        lr: Adam learning rate of :math:`\\phi` (1e-3 in the paper).
        momentum: of the reward's moving average (the baseline) and moving variance.
        seed: initialises :math:`\\phi` and fixes the validation inner-loop noise.
    """

    name = "ats"

    def __init__(self, validation: TaskBatch, temperature: float = 0.1, lr: float = 1e-3, momentum: float = 0.9,
                 seed: int = 0):
        if not temperature > 0:
            raise ValueError(f"temperature must be positive; got {temperature}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {momentum}")
        self.validation, self.temperature, self.momentum, self.seed = validation, temperature, momentum, seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = SchedulerNet(num_features=3)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.baseline: float | None = None
        self.reward_var = 1.0  # moving variance of the reward around the baseline
        self.last_val: float | None = None
        self.updates = 0
        self._log_prob: Tensor | None = None

    def probabilities(self, features: Tensor, progress: float) -> Tensor:
        """``phi``'s sampling probabilities ``[N]`` (with gradient) for raw features ``[N, 3]``."""
        return self.net(_standardise(features), progress, self.temperature)

    def select(self, learner, pool, num, progress, generator, noise_generator=None) -> Selection:
        if self.last_val is None:
            self.last_val = validation_loss(learner, self.validation, self.seed)
        features = task_features(learner, pool, noise_generator)
        probs = self.probabilities(features, progress)
        indices = sample_without_replacement(probs, num, generator)
        self._log_prob = plackett_luce_log_prob(probs, indices)
        return Selection(indices, probs.detach(), features)

    def observe(self, learner) -> dict[str, float]:
        """Reward = validation loss before - after the meta-update; one REINFORCE step on ``phi``."""
        if self._log_prob is None:
            raise RuntimeError("observe() needs a select() first")
        after = validation_loss(learner, self.validation, self.seed)
        reward = self.last_val - after
        if self.baseline is None:  # first reward: it sets the baseline and the scale of later advantages
            self.baseline, self.reward_var = reward, max(reward ** 2, 1e-12)
        advantage = max(-5.0, min(5.0, (reward - self.baseline) / self.reward_var ** 0.5))
        self.reward_var = self.momentum * self.reward_var + (1 - self.momentum) * (reward - self.baseline) ** 2
        self.baseline = self.momentum * self.baseline + (1 - self.momentum) * reward
        self.optimizer.zero_grad(set_to_none=True)
        (-advantage * self._log_prob).backward()
        self.optimizer.step()
        self._log_prob, self.last_val, self.updates = None, after, self.updates + 1
        return {"val_loss": after, "reward": reward, "advantage": advantage}

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "baseline": self.baseline,
                "reward_var": self.reward_var, "last_val": self.last_val, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline, self.reward_var = state["baseline"], float(state["reward_var"])
        self.last_val, self.updates = state["last_val"], int(state["updates"])


SCHEDULERS = ("uniform", "greedy", "ats")


def scheduled_meta_step(learner, scheduler: TaskScheduler, tasks, num: int, pool_size: int, progress: float,
                        generator: torch.Generator, noise_generator: torch.Generator | None = None,
                        update_meta_model: bool = True) -> tuple[dict[str, float], dict]:
    """Draw a pool of ``pool_size`` tasks, let ``scheduler`` pick ``num``, meta-update on them, let it observe.

    With ``update_meta_model=False`` (ATS's warm-up: the scheduler trained alone) the meta-update is made,
    observed and then undone. Returns the meta-step's numbers and a record of the pool for the log
    (weights, chosen indices, noise levels if the tasks carry them, features).
    """
    if not 1 <= num <= pool_size:
        raise ValueError(f"meta_batch={num} must be between 1 and pool_size={pool_size}")
    pool = tasks.sample(pool_size, generator)
    selection = scheduler.select(learner, pool, num, progress, generator, noise_generator)
    saved = None if update_meta_model else copy.deepcopy(learner.state_dict())
    before = getattr(scheduler, "last_val", None)
    info = learner.meta_step(pool.select(selection.indices.to(pool.x_train.device)), noise_generator)
    info.update(scheduler.observe(learner))
    if saved is not None:  # the meta-model goes back to where it was, and so does its validation loss
        learner.load_state_dict(saved)
        if isinstance(scheduler, AdaptiveTaskScheduler):
            scheduler.last_val = before
    noise = getattr(pool, "noise_level", None)
    record = {"weights": [round(float(w), 6) for w in selection.probabilities],
              "chosen": selection.indices.tolist(),
              "noise": None if noise is None else [round(float(r), 4) for r in noise]}
    if selection.features is not None:
        record["query_loss"] = [round(float(v), 5) for v in selection.features[:, 0]]
        record["cosine"] = [round(float(v), 5) for v in selection.features[:, 1]]
    return info, record
