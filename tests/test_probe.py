"""experiments/probe.py's classifier and sampling, without a model: by default the probe is MTL-LoRA
Appendix A.4's (a linear SVM with C = 1, one-vs-rest, on at most 1,000 examples a task, fitted on
a stratified 40 % and scored by macro-F1 on the other 60 %, averaged over five split seeds as
Table 6's caption says). The probe on real runs: tests/test_grid.py."""
import inspect

import numpy as np
import pytest

from conftest import need_extra
from experiments import probe


def test_the_default_probe_is_appendix_a4s():
    args = probe.parser().parse_args(["runs/x", "--out", "x.json"])
    assert (args.classifier, args.C, args.per_task, args.splits, args.standardize) == ("svm", 1.0, 1000, 5, False)
    defaults = {k: v.default for k, v in inspect.signature(probe.probe).parameters.items()}
    assert [defaults[k] for k in ("classifier", "C", "splits", "standardize")] == ["svm", 1.0, 5, False]
    assert probe.TRAIN_SHARE == 0.4
    need_extra("sklearn")
    from sklearn.svm import LinearSVC
    clf = probe.make_classifier("svm", 1.0, 0)
    assert isinstance(clf, LinearSVC)
    params = clf.get_params()
    assert (params["C"], params["multi_class"], params["penalty"]) == (1.0, "ovr", "l2")   # no kernel: linear
    with pytest.raises(ValueError, match="classifier must be one of"):
        probe.make_classifier("rbf", 1.0, 0)


def test_each_task_gives_at_most_per_task_examples():
    rng = np.random.default_rng(0)
    big = probe.pick(1500, 1000, rng)
    assert len(big) == len(set(big)) == 1000 and big == sorted(big) and max(big) < 1500
    assert probe.pick(300, 1000, rng) == list(range(300))           # fewer: all of them
    assert probe.pick(1500, 1000, np.random.default_rng(0)) == big   # seeded


@pytest.mark.parametrize("classifier", ["svm", "logreg"])
def test_the_probe_scores_macro_f1_on_the_60_percent_over_five_splits(classifier):
    """Three tasks: two apart from the rest and each other, one drawn on top of the second. The
    first task is told apart on every split (F1 1), the two others only by chance; macro-F1 is
    the mean of the three tasks' F1, averaged over the five splits."""
    need_extra("sklearn")
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(8.0, 1.0, (50, 4)), rng.normal(0.0, 1.0, (50, 4)), rng.normal(0.0, 1.0, (50, 4))])
    labels = ["a"] * 50 + ["b"] * 50 + ["c"] * 50
    r = probe.probe(x, labels, seed=3, classifier=classifier, tsne=False)
    assert (r["n_train"], r["n_test"], r["dim"], r["converged"]) == (60, 90, 4, True) and "tsne" not in r
    assert len(r["macro_f1_splits"]) == 5 and r["macro_f1"] == pytest.approx(np.mean(r["macro_f1_splits"]))
    assert list(r["per_task_f1"]) == ["a", "b", "c"] and r["per_task_f1"]["a"] == 1.0
    assert r["macro_f1"] == pytest.approx(np.mean(list(r["per_task_f1"].values())))
    assert max(r["per_task_f1"]["b"], r["per_task_f1"]["c"]) < 0.8
    assert probe.probe(x, labels, seed=3, classifier=classifier, tsne=False) == r      # seeded
