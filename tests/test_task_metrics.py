import warnings

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.tasks.metrics import (accuracy, check_metric_names, compute_metrics, f1, f1_macro, matthews_corrcoef,
                                   pearson, selection_metric, spearman)

sklearn_metrics = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


def _sklearn(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on the degenerate cases we compare on purpose
        return fn(*args, **kwargs)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_classes, n", [(2, 50), (2, 7), (3, 40), (5, 200), (5, 6)])
def test_classification_metrics_match_sklearn_on_random_labels(seed, num_classes, n):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    # Predictions agree with the labels some of the time, so the metrics are not all near chance.
    preds = np.where(rng.random(n) < 0.5, labels, rng.integers(0, num_classes, n))
    assert accuracy(preds, labels) == pytest.approx(sklearn_metrics.accuracy_score(labels, preds))
    assert matthews_corrcoef(preds, labels) == pytest.approx(_sklearn(sklearn_metrics.matthews_corrcoef,
                                                                       labels, preds))
    assert f1_macro(preds, labels) == pytest.approx(_sklearn(sklearn_metrics.f1_score, labels, preds,
                                                             average="macro", zero_division=0))
    for positive in range(num_classes):
        expected = _sklearn(sklearn_metrics.f1_score, labels == positive, preds == positive, zero_division=0)
        assert f1(preds, labels, positive=positive) == pytest.approx(expected)


@pytest.mark.parametrize("preds, labels", [
    ([1, 1, 1, 1], [1, 1, 1, 1]),  # one class throughout
    ([1, 1, 1, 1], [0, 1, 0, 1]),  # a constant prediction
    ([0, 1, 0, 1], [1, 1, 1, 1]),  # a constant truth
    ([2, 2, 2], [0, 1, 2]),
    ([0, 0, 0], [0, 0, 0]),  # no positive anywhere: binary F1 undefined
])
def test_degenerate_cases_match_sklearn_and_mcc_is_zero(preds, labels):
    assert matthews_corrcoef(preds, labels) == 0.0
    assert matthews_corrcoef(preds, labels) == _sklearn(sklearn_metrics.matthews_corrcoef, labels, preds)
    assert f1(preds, labels) == pytest.approx(_sklearn(sklearn_metrics.f1_score, np.equal(labels, 1),
                                                       np.equal(preds, 1), zero_division=0))
    assert f1_macro(preds, labels) == pytest.approx(_sklearn(sklearn_metrics.f1_score, labels, preds,
                                                             average="macro", zero_division=0))


def test_perfect_and_inverted_binary_predictions():
    labels = np.array([0, 1, 1, 0, 1])
    assert matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert matthews_corrcoef(1 - labels, labels) == pytest.approx(-1.0)
    assert f1(labels, labels) == accuracy(labels, labels) == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_correlations_match_scipy_including_ties(seed):
    rng = np.random.default_rng(seed)
    targets = np.round(rng.uniform(0, 5, 300), 1)  # rounded: many ties, as STS-B's scores
    preds = np.round(targets + rng.normal(0, 1.5, 300), 0)
    assert pearson(preds, targets) == pytest.approx(stats.pearsonr(preds, targets)[0])
    assert spearman(preds, targets) == pytest.approx(stats.spearmanr(preds, targets)[0])


def test_constant_predictions_correlate_zero():
    assert pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert spearman([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0


def test_compute_metrics_scores_the_configured_positive_class():
    preds, labels = [0, 0, 1, 0], [0, 1, 1, 0]
    scores = compute_metrics(["f1", "accuracy", "mcc"], preds, labels, positive=0)
    assert list(scores) == ["f1", "accuracy", "mcc"]
    assert scores["f1"] == pytest.approx(_sklearn(sklearn_metrics.f1_score, labels, preds, pos_label=0))
    assert scores["accuracy"] == 0.75
    assert compute_metrics(["f1"], preds, labels)["f1"] == pytest.approx(2 / 3)


def test_selection_metric_is_the_first_unless_named():
    assert selection_metric(["f1", "accuracy"]) == "f1"
    assert selection_metric(["f1", "accuracy"], "accuracy") == "accuracy"
    with pytest.raises(LmforgeError, match="'mcc' is not among the task's metrics"):
        selection_metric(["f1", "accuracy"], "mcc")


@pytest.mark.parametrize("names, kind, num_labels, message", [
    (["accuracy", "bleu"], "classification", 2, "metric 'bleu' does not apply to classification"),
    (["accuracy"], "regression", None, "metric 'accuracy' does not apply to regression"),
    (["f1"], "classification", 3, "use 'f1_macro'"),
    ([], "classification", 2, "no metrics given"),
])
def test_metric_names_are_checked_against_the_task(names, kind, num_labels, message):
    with pytest.raises(LmforgeError, match=message):
        check_metric_names(names, kind, num_labels)


def test_compute_metrics_refuses_an_unknown_name():
    with pytest.raises(LmforgeError, match="unknown metric 'bleu'"):
        compute_metrics(["bleu"], [0], [0])
