"""Shared test fixtures: paths to the parity fixtures, a tiny tokenizer, a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"

TINY_SENTENCES = [
    "the red circle", "the blue square on the left", "a green triangle", "the yellow one",
    "the leftmost shape", "the purple shape on the right", "the orange star", "the man on the left",
    "[semantic] wall", "[semantic] left shoe", "aeroplane body", "the astronaut on the left",
]


def fixture_dir(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "manifest.json").is_file():
        pytest.skip(f"parity fixture {path} not present (it ships in ../shared/fixtures)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from evfsam_lightning.data.tokenizer import build_tokenizer

    return build_tokenizer(TINY_SENTENCES * 5, tmp_path_factory.mktemp("tokenizer"), vocab_size=64,
                           added_tokens=["[semantic]"])


@pytest.fixture
def tiny_model():
    from evfsam_lightning.models.builders import build_model

    torch.manual_seed(0)
    return build_model("tiny")
