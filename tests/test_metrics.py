import numpy as np

from fashion_vit.metrics import classification_report, confusion_matrix


def test_report_matches_hand_computed_values():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 0, 1]
    cm = confusion_matrix(y_true, y_pred, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    r = classification_report(cm, ["a", "b", "c", "d"])
    assert r["accuracy"] == 3 / 6
    pc = r["per_class"]
    assert np.isclose(pc["a"]["precision"], 2 / 3) and np.isclose(pc["a"]["recall"], 2 / 3)
    assert np.isclose(pc["b"]["precision"], 1 / 3) and np.isclose(pc["b"]["recall"], 1 / 2)
    assert np.isclose(pc["b"]["f1"], 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert pc["c"]["f1"] == 0.0 and pc["c"]["support"] == 1
    # 'd' has no examples: left out of macro-F1 rather than counted as 0
    assert np.isclose(r["macro_f1"], (pc["a"]["f1"] + pc["b"]["f1"] + 0.0) / 3)
    assert r["num_examples"] == 6


def test_bootstrap_interval_is_wide_for_rare_classes_and_holds_the_estimate():
    from fashion_vit.metrics import bootstrap_macro_f1, honest_report

    # 1,000 common images per class, nearly all right; a rare class of 2, one of them right.
    cm = np.array([[990, 10, 0], [8, 992, 0], [0, 1, 1]])
    r = honest_report(cm, ["a", "b", "rare"])
    lo, hi = r["macro_f1_ci95"]
    assert lo < r["macro_f1"] < hi and hi - lo > 0.2  # two images cannot pin a class down
    assert r["common_classes"] == ["a", "b"] and np.isclose(
        r["macro_f1_common"], (r["per_class"]["a"]["f1"] + r["per_class"]["b"]["f1"]) / 2
    )
    # Common classes alone: a narrow interval around the estimate; the draw is seeded.
    lo2, hi2 = bootstrap_macro_f1(cm[:2, :2])
    assert hi2 - lo2 < 0.02 and (lo2, hi2) == bootstrap_macro_f1(cm[:2, :2])
