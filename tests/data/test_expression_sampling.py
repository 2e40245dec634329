"""Training draws a referring image's expressions the reference's way (issue 13 item 7): distinct
sentences from all sentences of all its objects, each with its object's mask; the distinct-object
draw stays as `data.expression_sampling=objects`."""

from __future__ import annotations

import numpy as np
import pytest

from evfsam_lightning.config import ConfigError, load
from evfsam_lightning.data.examples import pick_expressions, pick_sentences
from evfsam_lightning.data.mixing import sample_rng
from evfsam_lightning.data.schema import Sample, SampleObject
from tests.conftest import REPO

QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def _sample(*counts: int, task: str = "referring") -> Sample:
    objects = [SampleObject([f"object {i} sentence {j}" for j in range(n)], np.zeros((2, 2), np.uint8))
               for i, n in enumerate(counts)]
    return Sample(key="k", source="s", task=task, image_bytes=b"", image_ext="png", objects=objects,
                  height=2, width=2)


def test_fewer_sentences_than_k_gives_all_of_them_in_order():
    assert pick_sentences(_sample(1, 1), sample_rng(0, 0, 0, 0), 3) == [(0, 0), (1, 0)]


def test_k_distinct_sentences_drawn_uniformly_over_sentences_not_objects():
    sample = _sample(5, 1)  # object 0 has 5 sentences, object 1 one
    draws = [pick_sentences(sample, sample_rng(0, 0, g, 0), 3) for g in range(400)]
    assert all(len(d) == len(set(d)) == 3 for d in draws)
    assert all(0 <= j < len(sample.objects[i].expressions) for d in draws for i, j in d)
    with_object_1 = sum(any(i == 1 for i, _ in d) for d in draws) / len(draws)
    assert 0.4 < with_object_1 < 0.6  # 3 of 6 sentences: one half; the object draw always takes it
    assert all(any(i == 1 for i, _ in pick_expressions(sample, sample_rng(0, 0, g, 0), 3, "objects"))
               for g in range(50))
    assert len({tuple(d) for d in draws}) > 20  # orders and choices vary with the position
    assert draws == [pick_sentences(sample, sample_rng(0, 0, g, 0), 3) for g in range(400)]  # deterministic


def test_other_tasks_keep_drawing_objects():
    sample = _sample(1, 1, 1, 1, task="semantic")
    for g in range(20):
        picks = pick_expressions(sample, sample_rng(1, 0, g, 0), 3, "sentences")
        assert picks == pick_expressions(sample, sample_rng(1, 0, g, 0), 3, "objects")


def test_expression_sampling_is_a_validated_config_key():
    assert load(QUICKSTART, []).data.expression_sampling == "sentences"
    assert load(QUICKSTART, ["data.expression_sampling=objects"]).data.expression_sampling == "objects"
    with pytest.raises(ConfigError, match="data.expression_sampling"):
        load(QUICKSTART, ["data.expression_sampling=refs"])
