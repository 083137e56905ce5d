"""The shipped trained DiTs: offline loading, real ``__call__``, adherence, the fine-tuned checkpoint, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pytest_ditredundancy import load_model
from pytest_ditredundancy.zoo.trained import WEIGHTS

TRAINED = ("trained-pixart", "trained-sd3", "trained-pixart-ft")


@pytest.fixture(scope="module")
def trained():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(name, device="cpu")
        return cache[name]

    return get


@pytest.mark.parametrize("name", TRAINED)
def test_loads_offline_and_runs_its_real_call(name, trained, monkeypatch):
    from pytest_ditredundancy.profiling.samples import generate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = trained(name)
    assert type(pipe).__module__.startswith("diffusers.pipelines")
    assert pipe.transformer.dtype == torch.float32
    images = generate(pipe, ["a large red square in the center on a white background"] * 2, seed=0)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, generate(pipe, ["a large red square in the center on a white background"] * 2))


#: What 24 samples at the registered settings must reach: the 90% adherence target on every attribute (chance:
#: shape 1/3, colour 1/4, size 1/2, position 1/5, background 1/3). Measured on 120 samples: 96-99% shape, 100%
#: on the rest (docs/trained-models.md); these 24 score 100%.
BARS = {"shape": 0.9, "colour": 0.9, "size": 0.9, "position": 0.9, "background": 0.9}


@pytest.mark.parametrize("name", ["trained-pixart", "trained-sd3"])
def test_generated_images_match_their_captions(name, trained):
    from pytest_ditredundancy.profiling.samples import adherence_of

    result, _ = adherence_of(trained(name), count=24, seed=1000)
    assert all(result.accuracy[a] >= bar for a, bar in BARS.items()), result.accuracy


def test_an_untrained_pipeline_of_the_same_class_fails_the_bars():
    """The counterpart of the test above: same pipeline class, VAE and settings, random transformer."""
    from dataclasses import replace

    from pytest_ditredundancy.training.dit import RECIPES, build_pipeline
    from pytest_ditredundancy.profiling.samples import adherence_of
    from pytest_ditredundancy.training.vae import load_vae
    from pytest_ditredundancy.zoo.loading import _SPECS
    from pytest_ditredundancy.zoo.registry import get_spec

    pipe = build_pipeline(RECIPES["trained-pixart"], load_vae(WEIGHTS / "vae"))
    _SPECS[pipe] = replace(get_spec("trained-pixart"), name="untrained-pixart")
    result, _ = adherence_of(pipe, count=24, seed=1000)
    assert result.accuracy["colour"] < BARS["colour"] and result.accuracy["position"] < BARS["position"], \
        result.accuracy


def test_fine_tuned_checkpoint_differs_from_its_base(trained):
    base, tuned = trained("trained-pixart").transformer, trained("trained-pixart-ft").transformer
    assert {k: v for k, v in base.config.items() if k != "_name_or_path"} == \
        {k: v for k, v in tuned.config.items() if k != "_name_or_path"}
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    changed = [k for k in base_state if not torch.equal(base_state[k], tuned_state[k])]
    assert len(changed) > len(base_state) // 2
    record = json.loads((WEIGHTS / "trained-pixart-ft" / "training.json").read_text())
    assert record["settings"]["base"] == "trained-pixart"
    for component in ("vae", "text_encoder"):  # only the transformer was trained
        a, b = getattr(trained("trained-pixart"), component), getattr(trained("trained-pixart-ft"), component)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_specs_name_their_weights_inside_the_package():
    """Checkpoints are package-relative, so profiles and baselines never carry one machine's path."""
    from dataclasses import replace

    from pytest_ditredundancy.zoo.registry import get_spec
    from pytest_ditredundancy.zoo.trained import shipped_weights

    for name in TRAINED:
        spec = get_spec(name)
        assert spec.trained and spec.checkpoint == f"pytest_ditredundancy/weights/{name}"
        assert shipped_weights(spec) == WEIGHTS / name
    with pytest.raises(ValueError, match="must start with"):
        shipped_weights(replace(get_spec("trained-sd3"), checkpoint="/somewhere/else"))
    with pytest.raises(FileNotFoundError, match="retrain with"):
        shipped_weights(replace(get_spec("trained-sd3"), checkpoint="pytest_ditredundancy/weights/missing"))


def test_shipped_weights_fit_the_budget():
    files = [p for p in WEIGHTS.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert not [p for p in files if p.suffix == ".json" and "_name_or_path" in p.read_text()]
    assert total <= 30 * 2 ** 20, f"shipped weights are {total / 2 ** 20:.1f} MB, over the 30 MB budget"
    assert not list(WEIGHTS.rglob("*.bin")), "weights must be safetensors"


def test_training_entry_point_smoke(tmp_path):
    """Every recipe's code path, with a handful of steps, through the command line."""
    from pytest_ditredundancy.train import main

    weights = tmp_path / "weights"
    assert main(["vae", "--steps", "2", "--batch-size", "4", "--weights", str(weights), "--threads", "1"]) == 0
    assert main(["classifier", "--steps", "2", "--batch-size", "4", "--weights", str(weights)]) == 0
    for name in ("trained-pixart", "trained-sd3", "trained-pixart-ft"):
        assert main([name, "--steps", "2", "--batch-size", "4", "--pool-size", "16", "--weights", str(weights)]) == 0
    record = json.loads((weights / "trained-sd3" / "training.json").read_text())
    assert record["steps"] == 2 and record["settings"]["family"] == "sd3"
    pipe = load_model(str(weights / "trained-pixart-ft"), device="cpu")
    assert type(pipe).__name__ == "PixArtAlphaPipeline"


def test_training_rejects_bad_requests(tmp_path, capsys):
    from pytest_ditredundancy.train import main

    with pytest.raises(SystemExit):
        main(["trained-flux"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["vae", "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a usage error before training starts, naming the fix
        main(["trained-pixart", "--steps", "1", "--weights", str(tmp_path)])
    assert "train vae" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # a failed run leaves nothing half-written behind
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "mine.txt").write_text("not a model")
    with pytest.raises(SystemExit):
        main(["vae", "--steps", "1", "--out", str(keep)])
    assert "pass a new or empty folder" in capsys.readouterr().err
    assert (keep / "mine.txt").is_file()
