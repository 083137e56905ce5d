"""Suite 5 — model distinctness (the paper's first finding): with two or more models selected, the distance
between models' normalized profiles exceeds each model's prompt-to-prompt spread."""

import pytest


@pytest.mark.dit_cross_model
def test_models_are_distinct(dit_distinctness):
    dit_distinctness()
