"""The procedural shapes data, its tokenizers and the adherence classifier (fast, no DiT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pytest_ditredundancy.training.shapes import ATTRIBUTES, BACKGROUNDS, COLOURS, POSITIONS, Distribution, Shape, ShapeDataset, all_captions, parse_caption, render, to_tensor


def test_samples_depend_only_on_seed_and_index():
    a, b = ShapeDataset(seed=3).batch(10, 6), ShapeDataset(seed=3).batch(10, 6)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    image, shape = ShapeDataset(seed=3).sample(12)
    assert np.array_equal(image, a.images[2]) and shape == a.shapes[2]
    other = ShapeDataset(seed=4).batch(10, 6)
    assert not np.array_equal(a.images, other.images)


def test_captions_round_trip_and_name_every_attribute():
    for shape in ShapeDataset(seed=0).batch(0, 200).shapes:
        assert parse_caption(shape.caption) == shape
    assert len(all_captions()) == len(set(all_captions())) == np.prod([len(v) for v in ATTRIBUTES.values()])
    with pytest.raises(ValueError, match="not in this dataset's form"):
        parse_caption("a red bus")
    with pytest.raises(ValueError, match="colour 'pink'"):
        Shape("circle", "pink", "small", "in the center", "black")


def test_rendered_image_shows_its_caption():
    for shape in ShapeDataset(seed=1).batch(0, 60).shapes:
        image = render(shape).astype(int)
        x, y = (int(v) for v in POSITIONS[shape.position])
        assert np.abs(image[y, x] - COLOURS[shape.colour]).max() <= 1, shape.caption
        corner = (31 - 31 * (x > 16), 31 - 31 * (y > 16))  # the corner farthest from the shape
        assert np.abs(image[corner[1], corner[0]] - BACKGROUNDS[shape.background]).max() <= 1, shape.caption
    small = render(Shape("square", "red", "small", "in the center", "black"))
    large = render(Shape("square", "red", "large", "in the center", "black"))
    assert (large[..., 0] > 100).sum() > 2 * (small[..., 0] > 100).sum()


def test_distribution_shifts_frequencies_and_rejects_bad_weights():
    shifted = ShapeDataset(seed=0, distribution=Distribution({"background": {"white": 1.0}}))
    assert {s.background for s in shifted.batch(0, 50).shapes} == {"white"}
    with pytest.raises(ValueError, match="unknown attribute 'hue'"):
        Distribution({"hue": {"red": 1.0}})
    with pytest.raises(ValueError, match="unknown values"):
        Distribution({"colour": {"pink": 1.0}})
    with pytest.raises(ValueError, match="positive sum"):
        Distribution({"colour": {"red": 0.0}})


def test_tokenizers_give_one_token_per_caption_word():
    from pytest_ditredundancy.training.text import caption_words, word_clip_tokenizer, word_t5_tokenizer

    t5, clip = word_t5_tokenizer(16), word_clip_tokenizer(16)
    caption = "a large yellow triangle at the bottom right on a white background"
    assert len(t5(caption).input_ids) == len(caption.split()) + 1  # + </s>
    assert len(clip(caption).input_ids) == len(caption.split()) + 2  # + start and end
    for word in caption_words():
        assert len(clip(word, add_special_tokens=False).input_ids) == 1
    assert t5.unk_token_id not in t5("a purple bus").input_ids  # other text is spelt in characters


@pytest.fixture(scope="module")
def held_out():
    batch = ShapeDataset(seed=12345).batch(0, 300)
    return to_tensor(batch.images), batch.labels()


def test_shipped_classifier_reads_held_out_samples(held_out):
    from pytest_ditredundancy.training.adherence import CLASSIFIER
    from pytest_ditredundancy.training.classifier import accuracy_on, load_classifier

    accuracy = accuracy_on(load_classifier(CLASSIFIER), *held_out)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_untrained_classifier_is_at_chance(held_out):
    """The counterpart of the test above: the same check on a random net must fail its bar."""
    from pytest_ditredundancy.training.classifier import AttributeNet, accuracy_on

    torch.manual_seed(0)
    accuracy = accuracy_on(AttributeNet().eval(), *held_out)
    assert accuracy["shape"] < 0.6 and accuracy["colour"] < 0.6, accuracy


def test_score_accepts_pipeline_outputs_and_compares_runs():
    from PIL import Image

    from pytest_ditredundancy.training.adherence import score

    batch = ShapeDataset(seed=99).batch(0, 40)
    right = score(batch.images, batch.captions)
    assert right.accuracy["shape"] >= 0.9 and right.accuracy["colour"] >= 0.9
    as_float = score(batch.images / 255.0, batch.captions)
    as_pil = score([Image.fromarray(im) for im in batch.images], batch.captions)
    as_pt = score(torch.from_numpy(batch.images).permute(0, 3, 1, 2) / 255.0, batch.captions)
    for other in (as_float, as_pil, as_pt):
        assert np.array_equal(other.correct["colour"], right.correct["colour"])
    shuffled = batch.captions[1:] + batch.captions[:1]
    wrong = score(batch.images, shuffled)  # images that do not match their captions
    assert wrong.accuracy["colour"] < 0.6
    assert right.all_correct.sum() > wrong.all_correct.sum()
    with pytest.raises(ValueError, match="same captions"):
        right.changed(wrong)
    assert right.changed(as_pil) == {name: 0 for name in ATTRIBUTES}


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 4, 16, 16), np.float32), "numpy images must be"),
    (torch.zeros(2, 4, 16, 16), "latents"),
    (np.zeros((2, 64, 64, 3), np.uint8), "must be 32x32"),
    (np.full((2, 32, 32, 3), 2.0, np.float32), r"in \[0, 1\]"),
])
def test_score_rejects_what_it_cannot_read(images, message):
    from pytest_ditredundancy.training.adherence import score

    with pytest.raises(ValueError, match=message):
        score(images, all_captions()[:2])


def test_score_needs_one_caption_per_image():
    from pytest_ditredundancy.training.adherence import score

    with pytest.raises(ValueError, match="2 images but 1 captions"):
        score(np.zeros((2, 32, 32, 3), np.uint8), all_captions()[:1])
