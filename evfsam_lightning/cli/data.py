"""`evfsam-data`: look at what the data pipeline feeds the model.

    evfsam-data inspect CONFIG.yaml --samples 500 [--grid grid.png] [--rank 0 --world-size 1]
    evfsam-data inspect recipes/finetune_custom.yaml [key=value ...] --grid grid.png

prints the realized share of every source and task kind over the first N training images of one
rank (next to each source's target share) and the skip counts, and can render a grid of samples
with their masks overlaid and their expressions listed in the mask colours.

CONFIG is a training recipe (with `key=value` overrides, as for evfsam-train: the data the run
would see), or a YAML file with a `data:` section whose keys are the fields of
`evfsam_lightning.data.datamodule.DataConfig` (unknown keys are errors), for example:

    data:
      tokenizer: checkpoints/evf-sam/           # holds sentencepiece.bpe.model
      batch_size: 2                             # images per micro-batch and rank
      num_workers: 4
      seed: 0
      mixing: sample                            # or: batch (one source per batch)
      samples_per_epoch: 100000                 # images per epoch over all ranks
      sources:                                  # name, urls (brace pattern/dir/glob/pipe:), weight
        - {name: refcoco, urls: "shards/refcoco/refcoco-{000000..000099}.tar", weight: 16}
        - {name: ade20k, urls: shards/ade20k/, weight: 4}
      val_sources:
        - {name: refcoco_val, urls: "shards/refcoco_val/*.tar"}
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from evfsam_lightning.cli.errors import ArgumentParser, console_script
from evfsam_lightning.data.schema import IGNORE_VALUE

if TYPE_CHECKING:  # the datamodule imports Lightning: not needed to report a bad command line
    from evfsam_lightning.data.datamodule import DataConfig

_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230)]
_TILE, _LINE = 256, 12


def realized_mixture(config: DataConfig, samples: int, *, rank: int = 0, world_size: int = 1,
                     keep: int = 0) -> dict[str, Any]:
    """Run one rank's training stream for `samples` images; count sources, tasks and skips, and keep
    the first `keep` images (as (image, masks, expressions, title)) for a grid."""
    from evfsam_lightning.data.datamodule import EvfDataModule

    dm = EvfDataModule(config, rank=rank, world_size=world_size)
    sources, tasks, skips, kept = Counter(), Counter(), Counter(), []
    while sum(sources.values()) < samples:
        for batch in dm.train_dataloader():
            batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)
            skips.update({k: v for k, v in batch["data_stats"].items() if k != "images"})
            for i in range(len(batch["keys"])):
                if sum(sources.values()) == samples:
                    break
                sources[batch["sources"][i]] += 1
                tasks[batch["tasks"][i]] += 1
                if len(kept) < keep:
                    kept.append(_tile_inputs(batch, i))
            if sum(sources.values()) == samples:
                break
    return {"sources": sources, "tasks": tasks, "skips": skips, "tiles": kept}


def _tile_inputs(batch: dict[str, Any], i: int) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    from evfsam_lightning.data.transforms import SAM_PIXEL_MEAN, SAM_PIXEL_STD

    h, w = batch["resize_hw"][i].tolist()
    mean, std = np.array(SAM_PIXEL_MEAN), np.array(SAM_PIXEL_STD)
    pixels = batch["sam_pixel_values"][i, :, :h, :w].permute(1, 2, 0).numpy() * std + mean
    image = np.clip(pixels + 0.5, 0, 255).astype(np.uint8)
    masks = np.stack([np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST))
                      for m in batch["masks"][i].numpy()])
    lo, hi = batch["offsets"][i].item(), batch["offsets"][i + 1].item()
    return image, masks, batch["expressions"][lo:hi], f"{batch['sources'][i]} {batch['keys'][i]}"


def render_grid(tiles: Sequence[tuple[np.ndarray, np.ndarray, list[str], str]], max_lines: int = 3) -> Image.Image:
    """Tiles of images with masks overlaid (255 = ignore in grey) and their expressions below."""
    cols = max(1, int(np.ceil(np.sqrt(len(tiles)))))
    rows = max(1, -(-len(tiles) // cols))
    height = _TILE + _LINE * (max_lines + 1) + 4
    grid = Image.new("RGB", (cols * _TILE, rows * height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for t, (image, masks, expressions, title) in enumerate(tiles):
        x0, y0 = (t % cols) * _TILE, (t // cols) * height
        out = image.astype(np.float32)
        for j, mask in enumerate(masks):
            colour = np.array(_COLOURS[j % len(_COLOURS)], dtype=np.float32)
            out[mask == 1] = 0.5 * out[mask == 1] + 0.5 * colour
            out[mask == IGNORE_VALUE] = 0.5 * out[mask == IGNORE_VALUE] + 64
        scale = _TILE / max(image.shape[:2])
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        tile = Image.fromarray(out.astype(np.uint8)).resize(size, Image.BILINEAR)
        grid.paste(tile, (x0, y0))
        draw.text((x0 + 2, y0 + _TILE + 1), title[:42], fill=(0, 0, 0))
        for j, text in enumerate(expressions[:max_lines]):
            draw.text((x0 + 2, y0 + _TILE + 1 + _LINE * (j + 1)), text[:42], fill=_COLOURS[j % len(_COLOURS)])
    return grid


def _report(config: DataConfig, result: dict[str, Any], samples: int, rank: int, world_size: int) -> str:
    weights = {s.name: s.weight for s in config.sources}
    total_weight = sum(weights.values())
    lines = [f"realized mixture over {samples} images (rank {rank} of {world_size}, seed {config.seed}, "
             f"mixing {config.mixing}):", f"  {'source':<20}{'weight':>8}{'target':>9}{'realized':>10}{'images':>8}"]
    for name, w in weights.items():
        n = result["sources"][name]
        lines.append(f"  {name:<20}{w:>8g}{100 * w / total_weight:>8.1f}%{100 * n / samples:>9.1f}%{n:>8}")
    lines.append(f"  {'task':<20}{'realized':>27}{'images':>8}")
    for task, n in sorted(result["tasks"].items()):
        lines.append(f"  {task:<20}{100 * n / samples:>26.1f}%{n:>8}")
    bad = {k: v for k, v in result["skips"].items() if v and k != "skipped"}
    lines.append("skipped: " + (", ".join(f"{k} {v}" for k, v in sorted(bad.items())) if bad else "none"))
    return "\n".join(lines)


def _data_config(path: str, overrides: Sequence[str]) -> DataConfig:
    """The pipeline config of a training recipe (+ overrides) or of a `data:`-section file."""
    import yaml

    from evfsam_lightning.config import ConfigError, load

    if not Path(path).is_file():
        load(path)  # the recipe loader's one-line error for a missing path or a directory
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: malformed YAML ({str(e).splitlines()[0]})") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if isinstance(data, dict) and ("sources" in data or "tokenizer" in data):
        if overrides:
            raise ConfigError(f"{path} is a data config, not a recipe: overrides do not apply")
        from evfsam_lightning.data.datamodule import load_data_config

        try:
            return load_data_config(path)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    cfg = load(path, overrides)  # errors before the heavy imports below
    from evfsam_lightning.models.from_config import model_size
    from evfsam_lightning.training.run import data_config, resolve_pretrained

    cfg = resolve_pretrained(cfg)
    # the images themselves, not an embedding cache's features (which may not be built yet)
    return dataclasses.replace(data_config(cfg, model_size(cfg.model)), embedding_cache=None)


@console_script("evfsam-data")
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `evfsam-data`."""
    parser = ArgumentParser(prog="evfsam-data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="realized source/task shares and a sample grid",
                                  description="Print the realized share of each source and task kind over N "
                                              "training images and optionally render a grid of samples.")
    inspect.add_argument("config", help="training recipe, or YAML file with a `data:` section (see above)")
    inspect.add_argument("overrides", nargs="*", help="key=value overrides of a training recipe")
    inspect.add_argument("--samples", type=int, default=200, help="images to draw (default 200)")
    inspect.add_argument("--grid", help="write a PNG grid of the first images with mask overlays here")
    inspect.add_argument("--grid-images", type=int, default=16, help="images in the grid (default 16)")
    inspect.add_argument("--rank", type=int, default=0, help="the rank whose stream to draw (default 0)")
    inspect.add_argument("--world-size", type=int, default=1, help="number of ranks (default 1)")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be >= 1")
    if args.world_size < 1 or not 0 <= args.rank < args.world_size:
        parser.error(f"--rank {args.rank} must be in [0, --world-size {args.world_size})")
    if args.grid_images < 1:
        parser.error("--grid-images must be >= 1")
    config = _data_config(args.config, args.overrides)
    result = realized_mixture(config, args.samples, rank=args.rank, world_size=args.world_size,
                              keep=args.grid_images if args.grid else 0)
    print(_report(config, result, args.samples, args.rank, args.world_size))
    if args.grid:
        render_grid(result["tiles"]).save(args.grid)
        print(f"grid of {len(result['tiles'])} images written to {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
