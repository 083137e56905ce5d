"""Suite 3 — scheduler stability: the same shape comparison across schedulers that suit the model
(DPM-Solver / Euler / DDIM for ε- and v-prediction models; flow Euler / Heun / DPM-Solver for flow models)."""


def test_scheduler_stability(dit_check):
    dit_check.scheduler_stability()
