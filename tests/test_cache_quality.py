"""Quality metrics on images whose answers are known (scikit-image underneath), and the rank correlation."""

from __future__ import annotations

import numpy as np
import pytest

from pytest_ditredundancy.cache import quality
from pytest_ditredundancy.cache.quality import PSNR_CAP, as_images, latent_mse, psnr, spearman, ssim

pytest.importorskip("skimage")


def _image(seed=0, shape=(2, 16, 16, 3)):
    return np.random.default_rng(seed).uniform(0.2, 0.8, shape)


def test_psnr_of_a_known_offset_and_of_identical_images():
    image = _image()
    assert psnr(image, image + 0.1) == pytest.approx(20.0)  # MSE 0.01 at data range 1
    assert psnr(image, image + 0.01) == pytest.approx(40.0)
    assert psnr(image, image) == PSNR_CAP


def test_ssim_is_one_for_identical_images_and_low_for_unrelated_ones():
    image = _image()
    assert ssim(image, image) == pytest.approx(1.0)
    assert ssim(image, _image(seed=1)) < 0.2
    assert 0.5 < ssim(image, np.clip(image + np.random.default_rng(2).normal(0, 0.02, image.shape), 0, 1)) < 1.0


def test_video_frames_count_as_images_and_shapes_must_agree():
    video = _image(shape=(1, 3, 8, 8, 3))  # batch, frames, H, W, C
    assert as_images(video).shape == (3, 8, 8, 3)
    assert ssim(video, video) == pytest.approx(1.0)  # the window shrinks to fit 8x8 frames
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(video, video[:, :2])


def test_latent_mse_and_spearman():
    assert latent_mse(np.zeros(4), np.full(4, 0.5)) == pytest.approx(0.25)
    assert spearman([1, 2, 3, 4], [0.1, 0.3, 0.2, 0.9]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # undefined: reported as None, not NaN
    assert spearman([1, 2], [1, 2]) is None


def test_missing_scikit_image_is_explained(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_skimage(name, *args, **kwargs):
        if name.startswith("skimage"):
            raise ImportError("No module named 'skimage'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_skimage)
    with pytest.raises(quality.QualityDependencyError, match=r"pip install 'pytest-ditredundancy\[quality\]'"):
        psnr(_image(), _image())
