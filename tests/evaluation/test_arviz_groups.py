"""ArviZ that answers a researcher's questions: prior, posterior, posterior predictive, observed data and pointwise
log-likelihood groups with meaningful coordinates; az.compare of runs; prior-vs-posterior per layer; no r_hat /
ESS for i.i.d. variational draws."""

from __future__ import annotations

import warnings

import pytest
import torch

az = pytest.importorskip("arviz", reason="the diagnostics extra")

from hbmeta import GaussianLikelihood, MetaLearner, SinusoidTasks, mlp  # noqa: E402
from hbmeta.cli import main  # noqa: E402
from hbmeta.evaluation.diagnostics import compare_runs, diagnose, posterior_to_arviz  # noqa: E402


@pytest.fixture
def adapted():
    learner = MetaLearner(mlp(1, (8,), 1), GaussianLikelihood(0.4), prior_scale=0.1)
    batch = SinusoidTasks().sample(3, torch.Generator().manual_seed(0), k_query=6)
    return learner, batch, learner.adapt(batch.x_train, batch.y_train)


def test_inference_data_has_every_group_with_meaningful_coordinates(adapted):
    learner, batch, posterior = adapted
    gen = torch.Generator().manual_seed(1)
    idata = posterior_to_arviz(learner, posterior, batch.x_train, batch.y_train, batch.x_val, batch.y_val,
                               num_samples=40, generator=gen)
    assert {"prior", "posterior", "posterior_predictive", "observed_data", "log_likelihood"} <= set(idata.groups())
    assert list(idata.posterior["weight"].values[:2]) == ["0.weight[0,0]", "0.weight[1,0]"]  # layer names
    x = idata.log_likelihood["x"].values
    assert x.shape == (3, 6) and torch.allclose(torch.as_tensor(x), batch.x_val[..., 0])  # query inputs, per task
    # pointwise log-likelihood: log N(y_m; f_m, 0.4^2) of every draw and query point
    f = torch.as_tensor(idata.posterior["f"].values).double()
    manual = torch.distributions.Normal(f, 0.4).log_prob(batch.y_val.double()).sum(-1)
    torch.testing.assert_close(torch.as_tensor(idata.log_likelihood["y"].values), manual, rtol=1e-5, atol=1e-5)
    prior_sd = torch.as_tensor(idata.prior["theta"].values).reshape(-1, 3, 8).std(0)
    assert abs(prior_sd.mean().item() - 0.1) < 0.03  # draws of the learned prior (sd 0.1)
    with warnings.catch_warnings():  # an untrained net: WAIC's variance warning is expected
        warnings.simplefilter("ignore")
        assert az.waic(idata).elpd_waic < 0


def test_diagnose_drops_rhat_and_ess_and_plots_prior_vs_posterior(adapted, tmp_path):
    learner, batch, _ = adapted
    result = diagnose(learner, batch, tmp_path, num_samples=40, tasks_shown=2)
    summary = (tmp_path / "summary.csv").read_text().splitlines()[0]
    assert "mean" in summary and "r_hat" not in summary and "ess" not in summary
    assert result["paths"]["prior_vs_posterior.png"].stat().st_size > 0
    loaded = az.from_netcdf(str(tmp_path / "idata.nc"))
    assert "log_likelihood" in loaded.groups()


def test_compare_two_runs_on_the_same_tasks(tmp_path, capsys):
    for algo in ("gem-bml+", "maml"):
        assert main(["train", "sinusoid", "--algo", algo, "--iterations", "3", "--meta-batch", "3", "--out",
                     str(tmp_path / algo), "--no-progress", "--eval-tasks", "3"]) == 0
    report = compare_runs([tmp_path / "gem-bml+", tmp_path / "maml"], tmp_path / "cmp", num_tasks=4, num_samples=20,
                          ic="waic")
    table = report["table"]
    assert set(table.index) == {"gem-bml+", "maml"} and sorted(table["rank"]) == [0, 1]
    assert table.loc["maml", "p_waic"] == pytest.approx(0.0, abs=1e-6)  # a point estimate: one distinct draw
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "gem-bml+"), str(tmp_path / "maml"), "--tasks", "4", "--samples", "20",
                 "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "elpd_loo" in out and (tmp_path / "cli" / "compare.png").exists()
    assert report["iterations"] == {"gem-bml+": 3, "maml": 3} and "gem-bml+ at iteration 3" in out
    with pytest.raises(ValueError, match="at least two runs"):
        compare_runs([tmp_path / "maml"], tmp_path / "x")
