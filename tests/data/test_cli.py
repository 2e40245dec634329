"""`evfsam-data inspect`: realized shares and the sample grid."""

from __future__ import annotations

from PIL import Image

from evfsam_lightning.cli.data import main


def test_inspect_prints_realized_shares_and_writes_a_grid(three_sources, tokenizer_dir, tmp_path, capsys):
    root, _ = three_sources
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""model: {{size: tiny, tokenizer: {tokenizer_dir}}}
trainer: {{accelerator: cpu, micro_batch_size: 2, global_batch_size: 2}}
data:
  num_workers: 0
  samples_per_epoch: 24
  train:
    - {{name: refcoco, urls: ["{root}/refcoco/refcoco-{{000000..000004}}.tar"], weight: 4}}
    - {{name: ade20k, urls: ["{root}/ade20k"], weight: 2}}
    - {{name: pascal_part, urls: ["{root}/pascal_part/*.tar"], weight: 1}}
""")
    grid = tmp_path / "grid.png"
    assert main(["inspect", str(recipe), "--samples", "41", "--grid", str(grid), "--grid-images", "5"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.startswith("  ")}
    assert set(rows) >= {"refcoco", "ade20k", "pascal_part", "referring", "semantic", "part"}
    assert sum(int(rows[s][-1]) for s in ("refcoco", "ade20k", "pascal_part")) == 41
    assert sum(int(rows[t][-1]) for t in ("referring", "semantic", "part")) == 41
    assert rows["refcoco"][2] == "57.1%" and "skipped: none" in out
    with Image.open(grid) as im:
        assert im.size[0] == 3 * 256 and im.size[1] > 2 * 256
