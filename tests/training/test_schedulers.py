"""Task schedulers (ATS, Yao et al. 2021): Proposition 1, the scheduler's distribution, sampling without
replacement, symmetric label noise, limited budgets, a learned preference for clean tasks, and resume."""

from dataclasses import dataclass
from itertools import permutations

import pytest
import torch
from torch import nn

from hbmeta.experiments import make_config
from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.inner import InnerConfig
from hbmeta.inference.learner import MetaLearner
from hbmeta.models.likelihoods import GaussianLikelihood
from hbmeta.models.scheduler_net import SchedulerNet
from hbmeta.tasks.fewshot import FewShotTasks
from hbmeta.tasks.noisy import (
    NoisyBatch,
    NoisyTasks,
    flip_labels,
    noise_levels,
    restrict_classes,
    symmetric_transition_matrix,
)
from hbmeta.training.loop import train
from hbmeta.training.schedulers import (
    AdaptiveTaskScheduler,
    GreedyLossScheduler,
    UniformScheduler,
    plackett_luce_log_prob,
    sample_without_replacement,
    scheduled_meta_step,
    task_features,
    weighted_loss_decomposition,
)


# ------------------------------------------------------------------------------------------ Proposition 1
def test_proposition1_identity_holds_exactly_on_random_numbers(float64):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(2, 30, (1,), generator=gen))
        losses, inner = torch.rand(n, generator=gen) * 5, torch.randn(n, generator=gen)
        weights = torch.softmax(3 * torch.randn(n, generator=gen), 0)
        alpha = float(torch.rand(1, generator=gen))
        terms = weighted_loss_decomposition(losses, inner, weights, alpha)
        assert torch.allclose(terms["weighted"], terms["rhs"], atol=1e-12, rtol=0)
        assert not torch.allclose(terms["weighted"], terms["uniform"])  # the covariance terms matter


def test_proposition1_first_order_error_shrinks_like_alpha_squared_on_quadratic_losses(float64):
    """With the true one-step adapted query losses the identity holds up to O(alpha^2) (Taylor step, eq. 3)."""
    gen = torch.Generator().manual_seed(1)
    n, d = 8, 4
    xs, ys = torch.randn(n, 6, d, generator=gen), torch.randn(n, 6, generator=gen)
    xq, yq = torch.randn(n, 6, d, generator=gen), torch.randn(n, 6, generator=gen)
    theta0 = torch.randn(d, generator=gen)
    weights = torch.softmax(torch.randn(n, generator=gen), 0)

    def loss(x, y, th):  # per-task mean squared error, th [n, d] or [d]
        return ((x @ th.unsqueeze(-1) if th.dim() == 2 else x @ th).squeeze(-1) - y).pow(2).mean(-1)

    th = theta0.clone().requires_grad_()
    grads_s = torch.stack([torch.autograd.grad(loss(xs[i], ys[i], th), th)[0] for i in range(n)])
    grads_q = torch.stack([torch.autograd.grad(loss(xq[i], yq[i], th), th)[0] for i in range(n)])
    losses0 = loss(xq, yq, theta0.expand(n, d))
    errors = []
    for alpha in (1e-2, 5e-3):
        adapted = theta0 - alpha * grads_s
        exact = (weights * loss(xq, yq, adapted)).sum()
        terms = weighted_loss_decomposition(losses0, (grads_s * grads_q).sum(-1), weights, alpha)
        errors.append(float((exact - terms["rhs"]).abs()))
    assert errors[0] > 0 and 3.0 < errors[0] / errors[1] < 5.0  # halving alpha quarters the error


# ------------------------------------------------------------------------------------------ the scheduler
def test_scheduler_net_gives_a_distribution_over_the_pool_and_temperature_sharpens_it():
    net = SchedulerNet(num_features=3)
    features = torch.randn(12, 3)
    w1, w01 = net(features, 0.3, temperature=1.0), net(features, 0.3, temperature=0.1)
    for w in (w1, w01):
        assert w.shape == (12,) and (w > 0).all() and torch.isclose(w.sum(), torch.tensor(1.0))
    scores = net.scores(features, 0.3)
    assert torch.allclose(w01, torch.softmax(scores / 0.1, 0))
    entropy = [-(w * w.log()).sum() for w in (w1, w01, net(features, 0.3, temperature=100.0))]
    assert entropy[1] < entropy[0] < entropy[2] and entropy[2] > 0.999 * torch.log(torch.tensor(12.0))
    assert not torch.allclose(net(features, 0.0), net(features, 1.0))  # progress enters
    with pytest.raises(ValueError, match="temperature"):
        net(features, 0.3, temperature=0.0)
    with pytest.raises(ValueError, match=r"features must be \[pool, 3\]"):
        net(torch.randn(12, 2), 0.3)


def test_sampling_is_without_replacement_and_follows_plackett_luce():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    gen = torch.Generator().manual_seed(0)
    counts: dict[tuple[int, int], int] = {}
    draws = 8000
    for _ in range(draws):
        i, j = sample_without_replacement(probs, 2, gen).tolist()
        assert i != j
        counts[(i, j)] = counts.get((i, j), 0) + 1
    exact = {pair: float(plackett_luce_log_prob(probs, torch.tensor(pair)).exp()) for pair in permutations(range(4), 2)}
    assert abs(sum(exact.values()) - 1.0) < 1e-6
    for pair, p in exact.items():
        assert abs(counts.get(pair, 0) / draws - p) < 0.02, pair  # 4 standard errors
    idx = sample_without_replacement(torch.full((10,), 0.1), 10, gen)
    assert sorted(idx.tolist()) == list(range(10))
    with pytest.raises(ValueError, match="distinct"):
        sample_without_replacement(probs, 5, gen)
    with pytest.raises(ValueError, match="sum to 1"):
        sample_without_replacement(torch.tensor([0.5, 0.6]), 1, gen)


# ------------------------------------------------------------------------------------------ noisy tasks
def test_noisy_label_transition_matrix_matches_appendix_c():
    t = symmetric_transition_matrix(5, 0.8)  # appendix C, Figure 2: every entry 20%
    assert torch.allclose(t, torch.full((5, 5), 0.2))
    t = symmetric_transition_matrix(5, 0.4)
    assert torch.allclose(t.diagonal(), torch.full((5,), 0.6)) and torch.allclose(t.sum(1), torch.ones(5))
    assert torch.isclose(t[0, 1], torch.tensor(0.1))
    labels = torch.arange(5).repeat(40000, 1)  # 40000 of each class
    noisy = flip_labels(labels, 0.4, 5, torch.Generator().manual_seed(0))
    empirical = torch.stack([torch.bincount(noisy[labels == j], minlength=5) for j in range(5)]).float()
    empirical /= empirical.sum(1, keepdim=True)
    assert (empirical - t).abs().max() < 0.01
    with pytest.raises(ValueError, match="noise ratio"):
        symmetric_transition_matrix(5, 1.2)


def test_noisy_tasks_flip_only_support_labels_with_recorded_per_task_levels():
    base = FewShotTasks(torch.rand(12, 20, 1, 4, 4), ways=5, shots=5, queries=3)
    batch = NoisyTasks(base, noise=0.6).sample(200, torch.Generator().manual_seed(0))
    assert isinstance(batch, NoisyBatch) and batch.noise_level.shape == (200,)
    assert batch.noise_level.min() >= 0.2 and batch.noise_level.max() <= 1.0
    assert abs(float(batch.noise_level.mean()) - 0.6) < 0.05
    clean = base.sample(200, torch.Generator().manual_seed(0))  # same generator stream first: same clean tasks
    assert torch.equal(batch.y_val, clean.y_val) and torch.equal(batch.clean_y_train, clean.y_train)
    flipped = (batch.y_train != batch.clean_y_train).float().mean(1)
    assert torch.corrcoef(torch.stack([flipped, batch.noise_level]))[0, 1] > 0.5
    part = batch.select(torch.tensor([3, 7]))
    assert torch.equal(part.noise_level, batch.noise_level[[3, 7]])
    assert torch.allclose(noise_levels(0.0, 5), torch.zeros(5))


def test_class_budget_keeps_a_seeded_subset_of_classes():
    base = FewShotTasks(torch.arange(30).view(30, 1, 1).expand(30, 20, 1).float(), ways=5, shots=1, queries=1)
    small = restrict_classes(base, 8, seed=3)
    assert small.num_classes == 8 and torch.equal(small.classes, restrict_classes(base, 8, seed=3).classes)
    used = set(small.sample(50, torch.Generator().manual_seed(0)).x_train.flatten().tolist())
    assert used <= set(small.classes[:, 0, 0].tolist()) and len(used) == 8
    with pytest.raises(ValueError, match="class_budget"):
        restrict_classes(base, 3)


# ------------------------------------------------------------------------------------------ learning
D = 5
_W = torch.randn(D, generator=torch.Generator().manual_seed(1))


@dataclass
class HalfNoiseTasks:
    """Linear-regression tasks around a shared weight; in every pool half the tasks are pure noise."""

    k: int = 10

    def sample(self, n: int, gen: torch.Generator, k_query=None, noisy: bool = True) -> NoisyBatch:
        x = torch.randn(n, 2 * self.k, D, generator=gen)
        y = x @ (_W + 0.3 * torch.randn(n, D, generator=gen)).unsqueeze(-1)
        level = torch.zeros(n)
        if noisy:
            bad = torch.randperm(n, generator=gen)[: n // 2]
            y[bad] = 3 * torch.randn(len(bad), 2 * self.k, 1, generator=gen)  # y independent of x
            level[bad] = 1.0
        k = self.k
        return NoisyBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:], noise_level=level, clean_y_train=y[:, :k])


def _linear_learner() -> MetaLearner:
    return MetaLearner(nn.Sequential(nn.Linear(D, 1)), GaussianLikelihood(1.0), algorithm="fomaml", meta_lr=0.02,
                       meta_optimizer="sgd", inner=InnerConfig(steps=1, lr=0.1, optimizer="sgd"))


def test_briefly_trained_ats_gives_clean_tasks_more_weight_than_pure_noise_tasks():
    tasks = HalfNoiseTasks()
    val = tasks.sample(8, torch.Generator().manual_seed(5), noisy=False)
    learner = _linear_learner()
    ats = AdaptiveTaskScheduler(TaskBatch(val.x_train, val.y_train, val.x_val, val.y_val), temperature=1.0, lr=0.01)
    for it in range(200):
        gen = torch.Generator().manual_seed(100 + it)
        scheduled_meta_step(learner, ats, tasks, 3, 10, it / 200, gen, gen)
    clean_mass = []
    for k in range(20):  # fresh pools, scheduler frozen
        pool = tasks.sample(10, torch.Generator().manual_seed(10_000 + k))
        with torch.no_grad():
            w = ats.probabilities(task_features(learner, pool), 1.0)
        clean_mass.append(float(w[pool.noise_level == 0].sum()))
    assert sum(clean_mass) / len(clean_mass) > 0.75  # uniform gives 0.5


def test_greedy_and_uniform_schedulers_pick_distinct_tasks_from_the_pool():
    tasks = HalfNoiseTasks()
    pool = tasks.sample(10, torch.Generator().manual_seed(0))
    learner = _linear_learner()
    for scheduler in (UniformScheduler(), GreedyLossScheduler(0.5)):
        sel = scheduler.select(learner, pool, 4, 0.0, torch.Generator().manual_seed(1))
        assert len(set(sel.indices.tolist())) == 4 and torch.isclose(sel.probabilities.sum(), torch.tensor(1.0))
    noisy = pool.noise_level == 1  # greedy prefers the hard (here: noisy) tasks
    assert sel.probabilities[noisy].sum() > 0.9


def test_warm_up_step_trains_the_scheduler_but_leaves_the_meta_model_unchanged():
    tasks = HalfNoiseTasks()
    val = tasks.sample(4, torch.Generator().manual_seed(5), noisy=False)
    learner = _linear_learner()
    ats = AdaptiveTaskScheduler(TaskBatch(val.x_train, val.y_train, val.x_val, val.y_val), lr=0.05)
    before = learner.prior.loc.detach().clone()
    net_before = [p.detach().clone() for p in ats.net.parameters()]
    for it in range(3):
        gen = torch.Generator().manual_seed(it)
        _info, record = scheduled_meta_step(learner, ats, tasks, 3, 10, 0.0, gen, gen, update_meta_model=False)
    assert torch.equal(learner.prior.loc, before) and learner.iteration == 0
    assert any(not torch.equal(a, b) for a, b in zip(net_before, ats.net.parameters()))
    assert len(record["weights"]) == 10 and record["noise"].count(1.0) == 5 and len(record["chosen"]) == 3


# ------------------------------------------------------------------------------------------ integration
def test_config_and_cli_accept_scheduler_options_and_reject_bad_ones():
    from hbmeta.cli import build_parser, train_settings

    args = build_parser().parse_args(["train", "omniglot", "--scheduler", "ats", "--pool-size", "12", "--label-noise",
                                      "0.6", "--class-budget", "40", "--temperature", "0.5", "--meta-batch", "4",
                                      "--out", "x"])
    config = make_config(**train_settings(args))
    assert (config.scheduler.name, config.scheduler.pool_size, config.label_noise, config.class_budget, config.scheduler.temperature) == (
        "ats", 12, 0.6, 40, 0.5)
    noisy = make_config(experiment="omniglot", scheduler="ats", meta_batch=4, label_noise=0.2)
    assert noisy.scheduler.pool_size == 8 and noisy.scheduler.temperature == 0.1  # ATS's noisy-task temperature
    assert make_config(experiment="omniglot", scheduler="ats", meta_batch=4).scheduler.temperature == 1.0
    assert make_config(experiment="sinusoid").scheduler.pool_size is None  # uniform: no pool
    for bad, match in (({"scheduler": "bandit"}, "unknown scheduler"), ({"label_noise": 1.5}, "label_noise"),
                       ({"scheduler": "ats", "pool_size": 2}, "pool_size"),
                       ({"scheduler": "ats", "temperature": -1.0}, "temperature"),
                       ({"scheduler": "ats", "distributed": True}, "single-process")):
        with pytest.raises(ValueError, match=match):
            make_config(experiment="sinusoid", meta_batch=4, **bad)


def test_ats_run_resumes_to_exactly_the_uninterrupted_parameters(tmp_path):
    config = make_config(experiment="sinusoid", algorithm="maml", iterations=6, meta_batch=3, scheduler="ats",
                         pool_size=6, inner_steps=1, device="cpu", checkpoint_every=100, log_every=1)
    whole = train(config, tmp_path / "whole", progress=False)
    train(config, tmp_path / "split", progress=False, stop_after=4)
    resumed = train(config, tmp_path / "split", resume=True, progress=False)
    assert torch.equal(whole.learner.prior.loc, resumed.learner.prior.loc)
    saved = {k: torch.load(p / "checkpoint.pt", weights_only=True)["scheduler"] for k, p in
             (("whole", tmp_path / "whole"), ("split", tmp_path / "split"))}
    for name, value in saved["whole"]["net"].items():
        assert torch.equal(value, saved["split"]["net"][name]), name
    assert saved["whole"]["updates"] == 6 and saved["whole"]["baseline"] == saved["split"]["baseline"]
    lines = (tmp_path / "split" / "scheduler.jsonl").read_text().splitlines()
    assert len(lines) == 6 and (tmp_path / "whole" / "plots" / "scheduler_weights.png").stat().st_size > 0


def test_docstring_examples_of_the_scheduler_modules_run():
    import doctest

    import hbmeta.models.scheduler_net
    import hbmeta.tasks.noisy

    for module in (hbmeta.tasks.noisy, hbmeta.models.scheduler_net):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
