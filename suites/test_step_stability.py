"""Suite 2 — step-count stability: the shape of the profile over normalized time survives other step counts.

Profiles at the default step count and at each ``--dit-step-factors`` multiple are aligned on t/T and
compared per layer (correlation of mean-normalized curves).
"""


def test_step_count_stability(dit_check):
    dit_check.step_stability()
