"""Prompt adherence in the cache gate: a cache that keeps the pixels close but loses the prompt must fail."""

from __future__ import annotations

import numpy as np
import pytest

from pytest_ditredundancy.cache import adherence
from pytest_ditredundancy.cache.quality import psnr
from pytest_ditredundancy.training.shapes import Shape, render

SHAPES = [Shape(shape, colour, "large", "in the center", "black")
          for shape in ("circle", "square", "triangle") for colour in ("red", "green", "blue")]
CAPTIONS = [s.caption for s in SHAPES]


def images(shapes: list[Shape]) -> np.ndarray:
    return np.stack([render(s) for s in shapes]).astype(np.float64) / 255.0


def test_an_output_with_close_pixels_but_the_wrong_colour_fails_on_adherence():
    reference = images(SHAPES)
    # a tint that keeps PSNR high (the background is untouched) but turns red shapes green-ish: prompt lost
    tinted = reference.copy()
    red = [i for i, s in enumerate(SHAPES) if s.colour == "red"]
    tinted[red] = tinted[red][..., [1, 0, 2]]
    assert psnr(reference, tinted) > 12  # most pixels (the background) are identical
    result = adherence.measure(CAPTIONS, reference, tinted)
    assert result.reference == pytest.approx(1.0) and result.cached < result.reference
    failure = adherence.drop_failure(result, "cpu")
    assert failure is not None and "loses the prompt" in failure and "colour" in failure
    same = adherence.measure(CAPTIONS, reference, reference)
    assert adherence.drop_failure(same, "cpu") is None
    low, high = adherence.new_bounds(same, "cpu")
    assert low == pytest.approx(1 - 1 / len(CAPTIONS)) and high == 1.0


def test_prompts_that_are_not_captions_are_a_clear_error():
    with pytest.raises(adherence.AdherenceError, match="--dit-prompts=shapes"):
        adherence.measure(["a cat on a sofa"], images(SHAPES[:1]), images(SHAPES[:1]))


def test_only_trained_models_are_scored():
    from pytest_ditredundancy.zoo import get_spec

    assert adherence.applies_to(get_spec("trained-pixart")) and not adherence.applies_to(get_spec("tiny-pixart-alpha"))
