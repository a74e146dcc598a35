"""Classification metrics, fold summaries and the Jensen-Shannon instability metric."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import rel_entr
from sklearn.metrics import roc_auc_score

from wsi_asmil.mil.metrics import (
    accuracy,
    attention_summary,
    auc_macro_ovr,
    classification_metrics,
    effective_fraction,
    f1_macro,
    f1_micro,
    is_practically_uniform,
    js_divergence,
    last_mean,
    map_jsd,
    mean_jsd,
    summarize,
)


def test_accuracy_and_f1_by_hand() -> None:
    y_true = [0, 0, 1, 1, 2]
    y_pred = [0, 1, 1, 1, 0]
    # per-class F1: class 0 P=1/2 R=1/2 -> 1/2; class 1 P=2/3 R=1 -> 4/5; class 2 -> 0.
    assert accuracy(y_true, y_pred) == pytest.approx(0.6)
    assert f1_macro(y_true, y_pred, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert f1_micro(y_true, y_pred, 3) == pytest.approx(0.6)


def test_macro_f1_counts_a_never_predicted_class_as_zero() -> None:
    assert f1_macro([0, 1], [0, 0], 3) == pytest.approx((2 / 3 + 0 + 0) / 3)


def test_binary_auc_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]])
    # positives score 0.35 and 0.8, negatives 0.1 and 0.4: 3 of 4 pairs ordered correctly.
    assert auc_macro_ovr([0, 0, 1, 1], probs) == pytest.approx(0.75)


def test_multiclass_auc_is_macro_one_vs_rest() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    probs = rng.dirichlet(np.ones(3), size=30)
    expected = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert auc_macro_ovr(y, probs) == pytest.approx(expected)


def test_auc_is_nan_with_warning_when_a_class_is_absent() -> None:
    with pytest.warns(RuntimeWarning, match="absent"):
        assert math.isnan(auc_macro_ovr([1, 1], np.array([[0.2, 0.8], [0.4, 0.6]])))


def test_classification_metrics_keys_and_empty_input() -> None:
    m = classification_metrics([0, 1, 1], np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]]))
    assert m == pytest.approx({"acc": 2 / 3, "f1_macro": 2 / 3, "f1_micro": 2 / 3, "auc": 1.0, "n": 3.0})
    empty = classification_metrics([], np.zeros((0, 2)))
    assert empty["n"] == 0 and all(math.isnan(empty[k]) for k in ("acc", "f1_macro", "f1_micro", "auc"))


def test_summarize_mean_sample_std_and_nan_folds() -> None:
    folds = [{"acc": 0.5, "auc": 0.9, "name": "a"}, {"acc": 0.7, "auc": math.nan}, {"acc": 0.9, "auc": 0.7}]
    s = summarize(folds)
    assert set(s) == {"acc", "auc"}
    assert s["acc"] == pytest.approx({"mean": 0.7, "std": 0.2, "n": 3})
    assert s["auc"]["mean"] == pytest.approx(0.8) and s["auc"]["n"] == 2
    assert summarize([{"acc": 0.4}])["acc"] == {"mean": 0.4, "std": 0.0, "n": 1}
    from_json = summarize([{"jsd": None}, {"jsd": None}])["jsd"]  # NaN is stored as null
    assert math.isnan(from_json["mean"]) and from_json["n"] == 0


def test_jsd_by_hand_and_extremes() -> None:
    # m = [3/4, 1/4]; KL(p||m) = ln(4/3); KL(q||m) = (ln(2/3) + ln 2) / 2.
    expected = 0.5 * (math.log(4 / 3) + 0.5 * (math.log(2 / 3) + math.log(2)))
    assert js_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(expected)
    assert js_divergence([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == pytest.approx(0.0, abs=1e-15)
    assert js_divergence([1.0, 0.0], [0.0, 1.0]) == pytest.approx(math.log(2))


def test_jsd_rejects_mismatched_or_invalid_vectors() -> None:
    with pytest.raises(ValueError):
        js_divergence([0.5, 0.5], [1.0])
    with pytest.raises(ValueError):
        js_divergence([0.0, 0.0], [0.5, 0.5])


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 50).flatmap(
        lambda n: st.tuples(
            arrays(np.float64, n, elements=st.floats(0, 1e3)), arrays(np.float64, n, elements=st.floats(0, 1e3))
        )
    )
)
def test_jsd_is_bounded_symmetric_and_matches_scipy(pq: tuple[np.ndarray, np.ndarray]) -> None:
    p, q = pq
    if p.sum() == 0 or q.sum() == 0:
        return
    value = js_divergence(p, q)
    assert 0.0 <= value <= math.log(2)
    assert value == pytest.approx(js_divergence(q, p), abs=1e-12)
    p, q = p / p.sum(), q / q.sum()
    mid = (p + q) / 2
    assert value == pytest.approx(0.5 * (rel_entr(p, mid).sum() + rel_entr(q, mid).sum()), abs=1e-9)


def test_jsd_of_known_value() -> None:
    """p = (1/2, 1/2), q = (1, 0): mid = (3/4, 1/4); KL(p||mid) = 1/2 ln(4/3), KL(q||mid) = ln(4/3),
    so JSD = 3/4 ln(4/3) = 0.215762..., and disjoint supports give the maximum ln 2."""
    assert js_divergence([0.5, 0.5], [1.0, 0.0]) == pytest.approx(0.75 * math.log(4 / 3), abs=1e-15)
    assert js_divergence([0.5, 0.5], [1.0, 0.0]) == pytest.approx(0.2157615543388357, abs=1e-15)
    assert js_divergence([1.0, 0.0], [0.0, 1.0]) == pytest.approx(math.log(2), abs=1e-15)


def test_map_jsd_averages_per_map_not_the_averaged_map() -> None:
    """Two heads that swap their peaks: each map moves by ln 2, their mean does not move at all."""
    before = np.array([[1.0, 0.0], [0.0, 1.0]])
    after = before[::-1]
    assert map_jsd(before, after) == pytest.approx(math.log(2))
    assert js_divergence(before.mean(0), after.mean(0)) == 0.0
    assert map_jsd(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(0.75 * math.log(4 / 3))
    with pytest.raises(ValueError):
        map_jsd(before, np.ones((3, 2)))


def test_mean_jsd_averages_shared_slides() -> None:
    e1 = {"a": np.array([[1.0, 0.0]]), "b": np.array([[0.5, 0.5]])}
    e2 = {"a": np.array([[0.0, 1.0]]), "b": np.array([[0.5, 0.5]]), "c": np.array([[1.0]])}
    assert mean_jsd(e1, e2) == pytest.approx(math.log(2) / 2)
    assert math.isnan(mean_jsd({"x": np.ones(2)}, {"y": np.ones(2)}))


def test_effective_fraction_and_attention_summary_by_hand() -> None:
    assert effective_fraction(np.full(8, 1 / 8)) == pytest.approx(1.0)
    assert effective_fraction(np.array([1.0, 0, 0, 0])) == pytest.approx(0.25)
    # Two equal tiles of four: entropy ln 2, exp = 2 tiles, half the bag.
    assert effective_fraction(np.array([0.5, 0.5, 0, 0])) == pytest.approx(0.5)
    maps = np.array([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    logits = np.array([[1.0, 1.0, -1.0, -1.0], [2.0, 2.0, -2.0, -2.0]])
    s = attention_summary(maps, logits, positive=np.array([True, False, False, False]))
    assert s["effective_fraction"] == pytest.approx(0.5) and s["top_ratio"] == pytest.approx(2.0)
    assert s["logit_spread"] == pytest.approx(1.5)
    assert s["positive_mass"] == pytest.approx(0.5)
    assert s["instance_auc"] == pytest.approx(5 / 6)  # 0.5 vs (0.5, 0, 0): one tie of three pairs
    assert not is_practically_uniform(s)
    flat = attention_summary(np.full((3, 100), 0.01), np.zeros((3, 100)))
    assert is_practically_uniform(flat) and math.isnan(flat["instance_auc"])


def test_last_mean_ignores_nan_and_uses_last_n() -> None:
    values = [math.nan] + [float(i) for i in range(1, 13)]
    assert last_mean(values, 10) == pytest.approx(np.mean(range(3, 13)))
    assert math.isnan(last_mean([math.nan]))
