"""Suite 7 — cache tuning: for each ``--dit-cache-tune`` search on each model, the fastest setting that keeps the
``--dit-cache-floor`` floors.

With ``--dit-update-baselines`` the search runs and its frontier, cliffs and recommendation are stored; later runs
measure the stored frontier again and fail when the recommendation breaks the floors or the frontier moves.
Writes the recommendation (with the line of code that applies it) to ``--dit-cache-tune-dir``. Without
``--dit-cache-tune`` the suite is skipped and says how to select a search.
"""


def test_cache_tune(dit_cache_tune_check):
    dit_cache_tune_check.tune()
