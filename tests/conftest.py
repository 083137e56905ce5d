"""Shared fixtures: tiny pipelines are built once per session and reused (they are deterministic)."""

from __future__ import annotations

import os

import pytest
import torch

pytest_plugins = ["pytester"]

# Results differ at ~1e-6 between thread counts: pin one thread so runs are comparable everywhere.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_pipeline_cache():
    from pytest_ditredundancy import load_model

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(name, device="cpu")
        return cache[name]

    return get
