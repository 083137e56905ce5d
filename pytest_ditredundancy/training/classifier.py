"""A small CNN that reads shape, colour, size, position and background off a 32x32 image.

It is the judge of prompt adherence: trained on the same procedural data as the DiTs, with blur, noise and
tint augmentations so that the soft edges and colour drift of generated images do not fool it. Weights are
shipped as safetensors (about 0.5 MB) and the net is plain torch, so scoring needs no diffusers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .loop import LossLog, Schedule, run_steps, settings_of
from .shapes import ATTRIBUTES, ShapeDataset, to_tensor


class AttributeNet(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 px) and one linear head per attribute."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 2 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 16, 128), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images``: float ``[n, 3, 32, 32]`` in [-1, 1]; returns logits per attribute."""
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}


@dataclass(frozen=True)
class ClassifierRecipe:
    seed: int = 0
    width: int = 32
    schedule: Schedule = Schedule(steps=600, lr=2e-3, warmup=30, batch_size=64, weight_decay=1e-4)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What a decoder does to an image: blur of random strength, noise, a slight tint and contrast change."""
    n = x.shape[0]
    sigma = torch.rand(n, generator=generator) * 1.2
    kernel_x = torch.arange(-2, 3, dtype=torch.float32)
    kernels = torch.exp(-kernel_x[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)
    blurred = torch.stack([_blur(img, k) for img, k in zip(x, kernels)])
    tint = (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.2
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.3
    noise = torch.randn(x.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 0.1
    return (blurred * contrast + tint + noise).clamp(-1, 1)


def _blur(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    k = kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1)
    padded = F.pad(image[None], (2, 2, 0, 0), mode="replicate")
    image = F.conv2d(padded, k, groups=3)
    padded = F.pad(image, (0, 0, 2, 2), mode="replicate")
    return F.conv2d(padded, k.transpose(2, 3), groups=3)[0]


def train_classifier(recipe: ClassifierRecipe, out: Path) -> dict:
    torch.manual_seed(recipe.seed)
    net = AttributeNet(recipe.width).train()
    data = ShapeDataset(seed=recipe.seed + 500)  # not the DiTs' seed: the judge sees other samples
    size = recipe.schedule.batch_size
    generator = torch.Generator().manual_seed(recipe.seed)
    log = LossLog("classifier", settings_of(recipe.schedule) | {"width": recipe.width})

    def loss_at(step: int) -> torch.Tensor:
        batch = data.batch(step * size, size)
        logits = net(augment(to_tensor(batch.images), generator))
        labels = batch.labels()
        return sum(F.cross_entropy(logits[name], torch.from_numpy(labels[name])) for name in ATTRIBUTES)

    run_steps(recipe.schedule, log, list(net.parameters()), loss_at)
    net.eval()
    save_classifier(net, recipe.width, out)
    held_out = ShapeDataset(seed=recipe.seed + 2000).batch(0, 512)
    accuracy = accuracy_on(net, to_tensor(held_out.images), held_out.labels())
    log.save(out, {"held_out_accuracy": accuracy})
    return {"held_out_accuracy": accuracy}


def accuracy_on(net: AttributeNet, images: torch.Tensor, labels: dict) -> dict[str, float]:
    with torch.no_grad():
        logits = net(images)
    return {name: round(float((logits[name].argmax(1).numpy() == labels[name]).mean()), 4) for name in ATTRIBUTES}


def save_classifier(net: AttributeNet, width: int, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    config = {"width": width, "attributes": {k: list(v) for k, v in ATTRIBUTES.items()}}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")


def load_classifier(path: Path) -> AttributeNet:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no adherence classifier at {path}; train it with "
                                "`python -m pytest_ditredundancy.train classifier`")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if config["attributes"] != {k: list(v) for k, v in ATTRIBUTES.items()}:
        raise ValueError(f"the classifier at {path} was trained on other attribute values; retrain it")
    net = AttributeNet(config["width"])
    net.load_state_dict(load_file(str(path / "model.safetensors")))
    return net.eval()
