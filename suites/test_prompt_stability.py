"""Suite 1 — prompt stability: the redundancy profile barely depends on the prompt.

The paper reports a coefficient of variation over prompts of ~10–15% for every model it studied. Each kind
(K, V, A) gets the paper's statistic and a robust, mean-weighted CV with a jackknife confidence interval; the robust CV
must stay within the bounds stored in the model's baseline.
"""


def test_prompt_stability(dit_check):
    dit_check.prompt_stability()
