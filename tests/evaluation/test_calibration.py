"""ECE / MCE against hand-computed answers, the Bayesian-model-average predictive, reliability diagrams."""

import pytest
import torch

from hbmeta.evaluation.calibration import accuracy_ci95, calibration_errors, predictive_probabilities, reliability_diagram
from hbmeta.evaluation.meta_test import mean_ci95
from hbmeta.inference.learner import MetaLearner
from hbmeta.models import CategoricalLikelihood, mlp


def _binary(confidence: torch.Tensor) -> torch.Tensor:
    """Two-class probabilities whose top class (class 0) has the given confidence."""
    return torch.stack([confidence, 1 - confidence], -1)


def test_ece_is_near_zero_for_perfectly_calibrated_predictions():
    gen = torch.Generator().manual_seed(0)
    confidence = 0.5 + 0.5 * torch.rand(40_000, generator=gen, dtype=torch.float64)
    right = torch.rand(40_000, generator=gen, dtype=torch.float64) < confidence  # right with probability = confidence
    labels = torch.where(right, 0, 1)
    res = calibration_errors(_binary(confidence), labels)
    assert res["ece"] < 0.015  # sampling noise only: ~sqrt(p(1-p)/n_b) per bin
    assert res["accuracy"] == pytest.approx(0.75, abs=0.01)


def test_ece_and_mce_of_always_90_percent_confident_half_right_set_are_0_4():
    probs = _binary(torch.full((1000,), 0.9, dtype=torch.float64))
    labels = torch.arange(1000) % 2  # class 0 (predicted) on half the points
    res = calibration_errors(probs, labels)
    assert res["ece"] == pytest.approx(0.4, abs=1e-12)
    assert res["mce"] == pytest.approx(0.4, abs=1e-12)
    assert res["accuracy"] == 0.5
    assert res["bin_count"].tolist() == [0] * 13 + [1000, 0]  # 0.9 in (13/15, 14/15]


def test_two_bin_example_computed_by_hand():
    probs = torch.tensor([[0.40, 0.30, 0.30],    # conf 0.40 bin 0, label 0: right
                          [0.20, 0.45, 0.35],    # conf 0.45 bin 0, label 2: wrong
                          [0.50, 0.30, 0.20],    # conf 0.50 = edge, right-closed: bin 0, label 1: wrong
                          [0.80, 0.10, 0.10],    # conf 0.80 bin 1, label 0: right
                          [0.10, 0.60, 0.30],    # conf 0.60 bin 1, label 1: right
                          [0.70, 0.20, 0.10]],   # conf 0.70 bin 1, label 2: wrong
                         dtype=torch.float64)
    res = calibration_errors(probs, torch.tensor([0, 2, 1, 0, 1, 2]), num_bins=2)
    # bin 0: conf 0.45, acc 1/3, gap 7/60; bin 1: conf 0.7, acc 2/3, gap 1/30
    assert res["bin_count"].tolist() == [3, 3]
    torch.testing.assert_close(res["bin_confidence"], torch.tensor([0.45, 0.7], dtype=torch.float64))
    torch.testing.assert_close(res["bin_accuracy"], torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    assert res["ece"] == pytest.approx(0.5 * 7 / 60 + 0.5 * 1 / 30)
    assert res["mce"] == pytest.approx(7 / 60)
    assert res["accuracy"] == pytest.approx(0.5)


def test_mce_is_the_largest_gap_over_nonempty_bins_and_counts_sum_to_n():
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(3 * torch.randn(7, 30, 5, generator=gen), -1)
    labels = torch.randint(0, 5, (7, 30), generator=gen)
    res = calibration_errors(probs, labels, num_bins=10)
    filled = res["bin_count"] > 0
    gaps = (res["bin_accuracy"] - res["bin_confidence"]).abs()
    assert int(res["bin_count"].sum()) == res["count"] == 210
    assert res["mce"] == pytest.approx(float(gaps[filled].max()))
    assert torch.isnan(res["bin_accuracy"][~filled]).all()
    weighted = (res["bin_count"][filled].double() / 210 * gaps[filled]).sum()
    assert res["ece"] == pytest.approx(float(weighted)) and res["ece"] <= res["mce"]


@pytest.mark.parametrize("num_bins", [1, 3, 15])
def test_confidence_one_lands_in_last_bin_and_inner_edges_in_the_bin_below(num_bins):
    uniform = torch.full((num_bins,), 1 / num_bins, dtype=torch.float64)   # confidence exactly 1/B
    one_hot = torch.eye(num_bins, dtype=torch.float64)[0]                   # confidence exactly 1.0
    res = calibration_errors(torch.stack([uniform, one_hot]), torch.tensor([0, 0]), num_bins=num_bins)
    expected = [2] if num_bins == 1 else [1] + [0] * (num_bins - 2) + [1]  # 1/B sits in bin 0 = (0, 1/B]
    assert res["bin_count"].tolist() == expected


def test_bad_inputs_raise_with_the_offending_value():
    probs = torch.full((4, 2), 0.5)
    with pytest.raises(ValueError, match="integer"):
        calibration_errors(probs, torch.zeros(4))
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        calibration_errors(probs, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_bins"):
        calibration_errors(probs, torch.zeros(4, dtype=torch.long), num_bins=0)


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 12, 2, generator=gen), torch.randint(0, 3, (4, 12), generator=gen)
    return x, y


@pytest.mark.parametrize("algorithm", ["gem-bml+", "maml"])
def test_predictive_probabilities_are_the_average_softmax_and_sum_to_one(classifier, algorithm):
    x, y = classifier
    learner = MetaLearner(mlp(2, (16,), 3), CategoricalLikelihood(), algorithm)
    post = learner.adapt(x[:, :6], y[:, :6], steps=2, generator=torch.Generator().manual_seed(0))
    probs = predictive_probabilities(learner, post, x[:, 6:], 16, torch.Generator().manual_seed(3))
    samples = learner.predict(post, x[:, 6:], 16, torch.Generator().manual_seed(3)).samples
    assert probs.shape == (4, 6, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 6))
    if algorithm == "maml":  # a point estimate: just the softmax of its one prediction
        assert samples.shape[0] == 1
        torch.testing.assert_close(probs, torch.softmax(samples, -1).mean(0))
    else:  # Gauss-Newton VI's Gaussian predictive in function space: a fixed quasi-Monte-Carlo average, close to a
        # large Monte-Carlo one, the same at every call, and model averaging is not the softmax of the mean logits
        many = learner.predict(post, x[:, 6:], 20000, torch.Generator().manual_seed(4)).samples
        torch.testing.assert_close(probs, torch.softmax(many, -1).mean(0), atol=0.02, rtol=0)
        torch.testing.assert_close(probs, predictive_probabilities(learner, post, x[:, 6:], 16, None), atol=0, rtol=0)
        assert not torch.allclose(probs, torch.softmax(samples.mean(0), -1))


def test_reliability_diagram_writes_a_png_with_one_panel_per_method(tmp_path):
    gen = torch.Generator().manual_seed(2)
    probs = torch.softmax(2 * torch.randn(200, 4, generator=gen), -1)
    labels = torch.randint(0, 4, (200,), generator=gen)
    results = {"confident": calibration_errors(probs, labels),
               "uniform": calibration_errors(torch.full((200, 4), 0.25), labels)}
    path = reliability_diagram(results, tmp_path / "plots" / "reliability.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accuracy_ci95_is_mean_ci95_of_per_task_accuracy():
    correct = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    assert accuracy_ci95(correct) == mean_ci95(torch.tensor([0.5, 0.75, 0.25]))
    assert accuracy_ci95(torch.tensor([0.5, 0.75, 0.25]))[0] == pytest.approx(0.5)
