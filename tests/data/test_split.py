"""--val-fraction: a split by image, deterministic, stable when images are added."""

from __future__ import annotations

import pytest

from evfsam_lightning.data.convert import hash_split


def test_split_is_by_file_name_stable_and_close_to_the_fraction():
    names = [f"img_{i:05d}.jpg" for i in range(4000)]
    first = {n: hash_split(n, 0.1) for n in names}
    assert 0.08 < sum(s == "val" for s in first.values()) / len(names) < 0.12
    more = {n: hash_split(n, 0.1) for n in names + [f"new_{i}.jpg" for i in range(500)]}
    assert all(more[n] == first[n] for n in names)  # adding images moves none
    # JSONL paths and COCO file names of the same image agree; another seed draws another split.
    assert all(hash_split(f"photos/{n}", 0.1) == first[n] for n in names[:200])
    assert any(hash_split(n, 0.1, seed=1) != first[n] for n in names)
    assert hash_split("x.jpg", 0.0) == "train"
    with pytest.raises(ValueError, match="val-fraction"):
        hash_split("x.jpg", 1.0)
