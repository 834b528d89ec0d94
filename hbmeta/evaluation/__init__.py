"""Meta-test evaluation: error and accuracy after 0..N adaptation steps, calibration, ArviZ diagnostics, plots.

- :mod:`hbmeta.evaluation.meta_test`: regression / classification error on new tasks (Algorithm 1, Meta-test);
- :mod:`hbmeta.evaluation.calibration`: ECE, MCE, reliability diagrams, PIT (section 5.2, Table 3);
- :mod:`hbmeta.evaluation.diagnostics`: posterior diagnostics in ArviZ (needs the ``diagnostics`` extra);
- :mod:`hbmeta.evaluation.drug`, :mod:`hbmeta.evaluation.multimodal`, :mod:`hbmeta.evaluation.rl`: per-family metrics;
- :mod:`hbmeta.evaluation.plots`, :mod:`hbmeta.evaluation.rl_report`: figures and tables.

Evaluation reads run folders through :mod:`hbmeta.training` and never changes them.
"""

from hbmeta.evaluation.calibration import calibration_errors, predictive_probabilities, reliability_diagram
from hbmeta.evaluation.meta_test import (compare_calibration, evaluate_classification, evaluate_experiment,
                                         evaluate_regression, regression_errors)
from hbmeta.evaluation.stats import mean_ci95

__all__ = ["evaluate_regression", "evaluate_classification", "evaluate_experiment", "regression_errors", "mean_ci95",
           "compare_calibration", "calibration_errors", "predictive_probabilities", "reliability_diagram"]
