"""ArviZ export of meta-test posteriors, diagnostic plots, PIT checks and the `diagnose` entry points."""

import importlib.util
import json
import sys
import warnings

import numpy as np
import pytest
import torch

from hbmeta.evaluation.calibration import gaussian_mixture_pit, ks_uniform, pit_uniformity
from hbmeta.evaluation.diagnostics import diagnose, diagnose_run, diagnostic_plots, posterior_to_arviz, weight_indices
from hbmeta.experiments.config import TrainConfig
from hbmeta.inference.batch import TaskBatch
from hbmeta.inference.learner import MetaLearner
from hbmeta.models import CategoricalLikelihood, GaussianLikelihood, mlp
from hbmeta.tasks.sinusoid import SinusoidTasks
from hbmeta.training.loop import train



def _has_arviz() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # arviz 0.23's notice about the 1.x refactor
            import arviz  # noqa: F401
    except ImportError:
        return False
    return True


needs_arviz = pytest.mark.skipif(not _has_arviz(), reason="needs the `diagnostics` extra (arviz)")


@pytest.fixture(scope="module")
def regression():
    torch.manual_seed(0)
    learner = MetaLearner(mlp(), GaussianLikelihood(0.5), "gem-bml+")
    batch = SinusoidTasks(k_shot=5, k_query=7).sample(3, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    post = learner.adapt(batch.x_train, batch.y_train, steps=2, generator=gen)
    idata = posterior_to_arviz(learner, post, batch.x_train, batch.y_train, batch.x_val, batch.y_val,
                               num_samples=40, generator=gen)
    return learner, batch, idata


@pytest.fixture(scope="module")
def classification():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 14, 2, generator=gen), torch.randint(0, 3, (5, 14), generator=gen)
    batch = TaskBatch(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:])
    learner = MetaLearner(mlp(2, (16,), 3), CategoricalLikelihood(), "gem-bml+")
    return learner, batch


@needs_arviz
def test_regression_inference_data_has_groups_dims_and_shapes(regression):
    _, batch, idata = regression
    assert set(idata.groups()) == {"posterior", "posterior_predictive", "observed_data", "constant_data", "prior",
                                   "log_likelihood"}
    theta, f = idata.posterior["theta"], idata.posterior["f"]
    assert theta.dims == ("chain", "draw", "task", "weight") and theta.shape == (4, 10, 3, 8)
    assert f.dims == ("chain", "draw", "task", "point", "output") and f.shape == (4, 10, 3, 7, 1)
    y_rep = idata.posterior_predictive["y"]
    assert y_rep.dims == ("chain", "draw", "task", "point", "output") and y_rep.shape == (4, 10, 3, 7, 1)
    torch.testing.assert_close(torch.as_tensor(idata.observed_data["y"].values), batch.y_val)
    assert idata.constant_data["y_support"].shape == (3, 5, 1) and idata.constant_data["x_query"].shape == (3, 7, 1)
    assert idata.posterior_predictive.attrs["hbmeta_noise_scale"] == 0.5
    assert list(idata.posterior["weight"].values[:2]) == ["0.weight[0,0]", "0.weight[1,0]"]
    assert idata.posterior.attrs["hbmeta_kind"] == "regression"
    # y draws are f plus N(0, 0.5^2) noise
    noise = (y_rep - f).values
    assert abs(noise.std() - 0.5) < 0.05 and abs(noise.mean()) < 0.05


@needs_arviz
def test_classification_inference_data_draws_integer_labels(classification):
    learner, batch = classification
    gen = torch.Generator().manual_seed(0)
    post = learner.adapt(batch.x_train, batch.y_train, steps=2, generator=gen)
    idata = posterior_to_arviz(learner, post, batch.x_train, batch.y_train, batch.x_val, batch.y_val,
                               weights=["2.bias", 0], num_samples=20, generator=gen, chains=2)
    assert idata.posterior["theta"].shape == (2, 10, 5, 4)
    assert list(idata.posterior["weight"].values) == ["2.bias[0]", "2.bias[1]", "2.bias[2]", "0.weight[0,0]"]
    assert idata.posterior["f"].dims[-1] == "class" and idata.posterior["f"].shape[-1] == 3
    y_rep = idata.posterior_predictive["y"]
    assert y_rep.dims == ("chain", "draw", "task", "point") and y_rep.dtype.kind == "i"
    assert y_rep.values.min() >= 0 and y_rep.values.max() <= 2
    assert idata.observed_data["y"].shape == (5, 8)


def test_weight_indices_accept_flat_indices_names_and_indexed_slices():
    # parameters: 0.weight [4, 1] (flat 0-3), 0.bias (4-7), 2.weight [1, 4] (8-11), 2.bias (12)
    net = MetaLearner(mlp(1, (4,), 1), GaussianLikelihood(0.5)).model.net
    assert weight_indices(net)[1] == ["0.weight[0,0]", "0.weight[1,0]", "0.weight[2,0]", "0.weight[3,0]",
                                      "2.weight[0,0]", "2.weight[0,1]", "2.weight[0,2]", "2.weight[0,3]"]
    flat, labels = weight_indices(net, ["2.weight[0,3]", ("0.bias", slice(1, 3)), 12])
    assert flat == [11, 5, 6, 12] and labels == ["2.weight[0,3]", "0.bias[1]", "0.bias[2]", "2.bias[0]"]
    with pytest.raises(ValueError, match="'nope'"):
        weight_indices(net, ["nope"])
    with pytest.raises(ValueError, match="13"):
        weight_indices(net, [13])


def test_pit_of_a_correctly_specified_predictive_is_uniform_and_of_an_overconfident_one_is_not():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(30, 50, 40, 1, generator=gen).cumsum(0)       # [S, T, M, 1]: a spread-out mixture
    pick = torch.randint(0, 30, (50, 40, 1), generator=gen)
    y = f.gather(0, pick.unsqueeze(0)).squeeze(0) + 0.3 * torch.randn(50, 40, 1, generator=gen)  # y ~ predictive
    good = pit_uniformity(gaussian_mixture_pit(y, f, 0.3))
    assert good["ks_statistic"] < 0.04 and good["ks_pvalue"] > 0.01
    assert good["coverage_50"] == pytest.approx(0.5, abs=0.04) and good["coverage_90"] == pytest.approx(0.9, abs=0.03)
    narrow = pit_uniformity(gaussian_mixture_pit(y, f.mean(0, keepdim=True), 0.3))   # ignores the spread of f
    assert narrow["ks_pvalue"] < 1e-6 and narrow["coverage_90"] < 0.6


@needs_arviz
def test_diagnose_classification_writes_plots_summary_and_calibration_json(classification, tmp_path):
    learner, batch = classification
    result = diagnose(learner, batch, tmp_path, num_samples=40, steps=2, tasks_shown=3, chunk=2)  # 3 chunks
    assert result["idata"].posterior.sizes["task"] == 3  # shown tasks gathered across chunks
    names = {"ppc_class_counts.png", "reliability.png", "posterior_forest.png", "summary.csv", "diagnostics.json"}
    assert names <= set(result["paths"]) and all(p.exists() for p in result["paths"].values())
    record = json.loads((tmp_path / "diagnostics.json").read_text())
    m = record["metrics"]
    assert record["kind"] == "classification" and m["num_bins"] == 15 and m["num_predictions"] == 5 * 8
    assert 0 <= m["ece"] <= m["mce"] <= 1 and 0 <= m["accuracy"] <= 1 and sum(m["bin_count"]) == 40
    assert "r_hat" not in (tmp_path / "summary.csv").read_text().splitlines()[0]  # i.i.d. variational draws


@needs_arviz
def test_point_estimate_posterior_summary_skips_r_hat(classification, tmp_path):
    _, batch = classification
    learner = MetaLearner(mlp(2, (16,), 3), CategoricalLikelihood(), "maml")
    post = learner.adapt(batch.x_train, batch.y_train, steps=1)
    idata = posterior_to_arviz(learner, post.select(slice(0, 1)), *(t[:1] for t in (batch.x_train, batch.y_train,
                               batch.x_val, batch.y_val)), num_samples=8)
    theta = idata.posterior["theta"]
    assert float((theta.max(("chain", "draw")) - theta.min(("chain", "draw"))).max()) == 0  # a point mass
    diagnostic_plots(idata, tmp_path)
    header = (tmp_path / "summary.csv").read_text().splitlines()[0]
    assert "mean" in header and "r_hat" not in header  # r_hat of a constant is undefined (and would warn)


@needs_arviz
def test_diagnose_run_on_a_tiny_sinusoid_run_writes_regression_diagnostics(tmp_path):
    train(TrainConfig(iterations=5, meta_batch=4, device="cpu"), tmp_path, progress=False)
    result = diagnose_run(tmp_path, num_tasks=8)
    out = tmp_path / "diagnostics"
    for name in ("ppc.png", "pit.png", "pit_all_tasks.png", "posterior_forest.png", "summary.csv", "diagnostics.json"):
        assert (out / name).exists(), name
    record = json.loads((out / "diagnostics.json").read_text())
    assert record["kind"] == "regression" and record["iteration"] == 5 and record["adaptation_steps"] == 10
    assert record["num_tasks"] == 8 and record["inference_data"]["pseudo_chains"] == 4
    pit = record["metrics"]["pit"]
    assert pit["num_points"] == 8 * 10 and 0 <= pit["coverage_50"] <= pit["coverage_90"] <= 1
    assert result["metrics"]["mse"] > 0


def test_ks_statistic_and_pvalue_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n, power in ((20, 1.0), (80, 2.0), (400, 1.3)):
        u = rng.uniform(size=n) ** power
        ref = stats.kstest(u, "uniform")
        statistic, pvalue = ks_uniform(u)
        assert statistic == pytest.approx(ref.statistic, abs=1e-12) and pvalue == pytest.approx(ref.pvalue, abs=0.02)


def test_without_arviz_the_module_imports_and_its_functions_raise_an_install_hint(monkeypatch):
    learner = MetaLearner(mlp(1, (4,), 1), GaussianLikelihood(0.5))
    batch = SinusoidTasks(k_shot=3, k_query=3).sample(2, torch.Generator().manual_seed(0))
    monkeypatch.setitem(sys.modules, "arviz", None)  # `import arviz` now raises ImportError
    spec = importlib.util.find_spec("hbmeta.evaluation.diagnostics")
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)  # a fresh copy of the module imports fine without arviz
    post = learner.adapt(batch.x_train, batch.y_train, steps=0)
    with pytest.raises(ImportError, match=r"pip install hbmeta\[diagnostics\]"):
        fresh.posterior_to_arviz(learner, post, batch.x_train, batch.y_train, batch.x_val, batch.y_val)
