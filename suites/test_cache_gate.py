"""Suite 6 — cache gate: each ``--dit-cache`` strategy on each model, against the uncached run.

Asserts output quality (PSNR, same seeds and prompts) and the fraction of attention compute skipped
within the bounds stored in the model's baseline (both directions: an unexplained jump is flagged too);
records speedup, SSIM, latent MSE and, for the profile schedule, how well the profile predicts the error.
Without ``--dit-cache`` the suite is skipped and says how to select strategies.
"""


def test_cache_gate(dit_cache_check):
    dit_cache_check.gate()
