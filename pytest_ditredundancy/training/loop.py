"""What every training run shares: thread count, seeding, the learning-rate schedule and the loss log.

Kept apart from the models so that each recipe (VAE, classifier, DiTs) is only its model and its loss.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch


@dataclass(frozen=True)
class Schedule:
    """AdamW with linear warm-up and cosine decay to ``final_fraction`` of ``lr``: the usual recipe, and the
    one that reached a low loss in the fewest CPU minutes in our runs."""

    steps: int
    lr: float
    warmup: int = 100
    final_fraction: float = 0.05
    weight_decay: float = 0.0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def optimizer(self, parameters: Iterable[torch.nn.Parameter]) -> tuple[torch.optim.Optimizer, object]:
        opt = torch.optim.AdamW(list(parameters), lr=self.lr, weight_decay=self.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, self.factor)


@dataclass
class LossLog:
    """Loss per step (smoothed for the curve) and wall time; written next to the weights as ``training.json``."""

    name: str
    settings: dict
    losses: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    started_cpu: float = field(default_factory=time.process_time)
    seconds: float = 0.0  # wall time; on a shared machine cpu_seconds says more about the recipe's cost
    cpu_seconds: float = 0.0

    def add(self, loss: float, every: int = 50) -> None:
        self.losses.append(float(loss))
        self.seconds = time.time() - self.started
        self.cpu_seconds = time.process_time() - self.started_cpu
        step = len(self.losses)
        if step % every == 0 or step == self.settings.get("steps"):
            recent = self.losses[-every:]
            print(f"[{self.name}] step {step}: loss {sum(recent) / len(recent):.5f} ({self.seconds:.0f} s)",
                  flush=True)

    def smoothed(self, window: int = 50) -> list[float]:
        out, acc = [], 0.0
        for i, value in enumerate(self.losses):
            acc += value
            if i >= window:
                acc -= self.losses[i - window]
            out.append(acc / min(i + 1, window))
        return out

    def save(self, directory: Path, extra: dict | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        stride = max(1, len(self.losses) // 400)  # a curve, not every step: keeps the file small
        record = {"name": self.name, "settings": self.settings, "seconds": round(self.seconds, 1),
                  "cpu_seconds": round(self.cpu_seconds, 1),
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": len(self.losses),
                  "final_loss": round(sum(self.losses[-100:]) / max(1, len(self.losses[-100:])), 6),
                  "curve_stride": stride, **(extra or {})}
        curve = json.dumps([round(v, 6) for v in self.smoothed()[::stride]])  # one line: the file stays readable
        text = json.dumps(record, indent=1)[:-2] + f',\n "loss_curve": {curve}\n}}\n'
        (directory / "training.json").write_text(text, encoding="utf-8")


def run_steps(schedule: Schedule, log: LossLog, parameters: list[torch.nn.Parameter],
              loss_at: Callable[[int], torch.Tensor], clip: float = 1.0) -> None:
    """The optimisation loop: ``loss_at(step)`` builds the step's batch and returns its loss."""
    opt, lr = schedule.optimizer(parameters)
    for step in range(schedule.steps):
        loss = loss_at(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{log.name}: loss became {loss.item()} at step {step}; lower the learning "
                                     f"rate (now {schedule.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, clip)
        opt.step()
        lr.step()
        log.add(loss.item())


def settings_of(obj) -> dict:
    """A dataclass as plain JSON-able settings for the training record."""
    return json.loads(json.dumps(asdict(obj), default=str))
