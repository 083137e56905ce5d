"""Suite 4 — baseline regression: the run's mean profile against the stored one, per kind × layer × step,
two-sided, with tolerances from the stored prompt-to-prompt spread plus floors."""


def test_matches_baseline(dit_check):
    dit_check.baseline_regression()
