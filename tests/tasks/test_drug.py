"""FS-Mol drug-activity assays: loader shapes, fold separation, task sampling, the R^2 metric, the base model."""

import numpy as np
import pytest
import torch
from torch import nn

from hbmeta.evaluation.drug import evaluate_drug
from hbmeta.inference.inner import InnerConfig
from hbmeta.inference.learner import MetaLearner
from hbmeta.models.likelihoods import GaussianLikelihood
from hbmeta.tasks.data import default_data_root
from hbmeta.tasks.data.drug import DRUG_FILE, load_drug_assays
from hbmeta.tasks.drug import DrugTasks, drug_net, squared_correlation

DATA = default_data_root() / DRUG_FILE
needs_data = pytest.mark.skipif(not DATA.is_file(), reason=f"FS-Mol drug data not found at {DATA}")


@pytest.fixture(scope="module")
def folds():
    return {part: load_drug_assays(part=part) for part in ("train", "valid", "test")}


@needs_data
def test_drug_loader_shapes_and_fold_sizes(folds):
    assert [len(folds[p]) for p in ("train", "valid", "test")] == [4525, 23, 112]
    test = folds["test"]
    assert test.offsets[0] == 0 and test.offsets[-1] == len(test.y) == len(test.mol_index)
    rows = test.rows(0)
    x, y = test.features(rows), test.targets(rows)
    assert x.shape == (len(rows), 2048) and y.shape == (len(rows),) and torch.isfinite(y).all()
    assert set(x.unique().tolist()) <= {0.0, 1.0} and (x.sum(1) > 0).all()
    with np.load(DATA) as raw:  # the README's dense form of one molecule's count fingerprint
        m = int(test.mol_index[rows[3]])
        p0, p1 = raw["fp_indptr"][m], raw["fp_indptr"][m + 1]
        dense = np.zeros(2048, np.float32)
        dense[raw["fp_indices"][p0:p1]] = raw["fp_counts"][p0:p1]
    assert np.array_equal(x[3].numpy(), (dense > 0).astype(np.float32))


@needs_data
def test_drug_folds_share_no_assay(folds):
    ids = {p: set(a.task_ids) for p, a in folds.items()}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["valid"] and not ids["valid"] & ids["test"]
    assert len(ids["train"]) == 4525  # ChEMBL assay ids are unique within a fold too


@needs_data
def test_drug_tasks_sample_distinct_assays_with_standardised_targets(folds):
    tasks = DrugTasks(folds["train"], 16, 16, float(folds["train"].y.mean()), float(folds["train"].y.std()))
    batch = tasks.sample(8, torch.Generator().manual_seed(0))
    assert batch.x_train.shape == (8, 16, 2048) and batch.y_train.shape == (8, 16, 1)
    assert batch.x_val.shape == (8, 16, 2048) and batch.y_val.shape == (8, 16, 1)
    assert abs(float(torch.cat([batch.y_train, batch.y_val]).mean())) < 1.0
    again = tasks.sample(8, torch.Generator().manual_seed(0))
    assert torch.equal(batch.x_train, again.x_train)  # seeded by the generator only
    with pytest.raises(ValueError, match="num_tasks"):
        tasks.sample(0)


def test_squared_correlation_is_one_for_affine_maps_and_near_zero_for_independent_values():
    y = torch.randn(200)
    assert abs(squared_correlation(3 * y + 2, y) - 1) < 1e-9
    assert squared_correlation(torch.randn(5000), torch.randn(5000)) < 0.01
    assert squared_correlation(torch.zeros(10), y[:10]) == 0.0


def test_drug_net_is_two_500_unit_leaky_relu_layers_and_a_linear_output():
    net = drug_net()
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 500), (500, 500), (500, 1)]
    assert sum(isinstance(m, nn.LeakyReLU) for m in net) == 2


@needs_data
def test_evaluate_drug_reports_mean_and_median_r2_per_assay(folds):
    tasks = DrugTasks(folds["test"], 16, 16)
    learner = MetaLearner(nn.Sequential(nn.Linear(2048, 8), nn.LeakyReLU(), nn.Linear(8, 1)), GaussianLikelihood(1.0),
                          algorithm="maml", inner=InnerConfig(steps=1, lr=0.01, optimizer="sgd"))
    result = evaluate_drug(learner, tasks, steps=(0, 2), num_tasks=3, chunk=2)
    assert set(result) == {0, 2}
    for r in result.values():
        assert r["num_tasks"] == 3 and 0 <= r["r2_median"] <= 1 and 0 <= r["r2_mean"] <= 1
    assert result[0]["r2_mean"] != result[2]["r2_mean"]  # adaptation changes the predictions


def test_missing_drug_file_is_an_error_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="fsmol_pxc50_tasks.npz"):
        load_drug_assays(tmp_path)
    with pytest.raises(ValueError, match="fold"):
        load_drug_assays(tmp_path, part="validation")
