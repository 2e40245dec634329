"""Full-size models built on the meta device match the official checkpoints key for key."""

from __future__ import annotations

import json

import pytest

from evfsam_lightning.models.builders import build_model
from evfsam_lightning.models.checkpoints import to_reference
from tests.conftest import FIXTURES


def _official(name: str) -> dict:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    data = json.loads(path.read_text())
    return data, {k["name"]: tuple(k["shape"]) for k in data["keys"]}


@pytest.mark.parametrize("size,keys_file", [("evf-sam", "official_full_keys_large.json"),
                                            ("evf-sam-beit3-base", "official_full_keys_base.json")])
def test_export_keys_and_shapes_equal_official(size, keys_file):
    data, official = _official(keys_file)
    model = build_model(size, device="meta")
    exported = {k: tuple(v.shape) for k, v in to_reference(model, model.state_dict()).items()}
    assert set(exported) - set(official) == set()
    assert set(official) - set(exported) == set()
    assert {k: s for k, s in exported.items() if official[k] != s} == {}
    assert len(exported) == data["num_tensors"]
    assert sum(p.numel() for p in model.parameters()) == data["num_params"]


def test_evf_sam_has_the_published_parameter_count():
    model = build_model("evf-sam", device="meta")
    assert sum(p.numel() for p in model.parameters()) == 1_315_105_328
