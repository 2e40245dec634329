"""`evfsam-data`: look at what the data pipeline feeds the model.

    evfsam-data inspect RECIPE.yaml [key=value ...] --samples 500 [--grid grid.png] [--rank 0 --world-size 1]

prints the realized share of every source and task kind over the first N training images of one
rank (next to each source's target share) and the skip counts, and can render a grid of samples
with their masks overlaid and their expressions listed in the mask colours.

RECIPE is a training recipe, with `key=value` overrides as for evfsam-train: the data the run would
see (its `data:` section, the tokenizer of `model.tokenizer` / `model.pretrained`, the micro-batch
of `trainer.micro_batch_size`, the model's image sizes), for example:

    evfsam-data inspect recipes/finetune_custom.yaml --samples 32 --grid grid.png
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

if TYPE_CHECKING:  # kept out of the start-up: not needed to report a bad command line
    from evfsam_lightning.config import DataConfig
    from evfsam_lightning.data.settings import PipelineSettings

_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230)]
_TILE, _LINE = 256, 12


def realized_mixture(data: DataConfig, settings: PipelineSettings, samples: int, *, rank: int = 0,
                     world_size: int = 1, keep: int = 0) -> dict[str, Any]:
    """Run one rank's training stream for `samples` images; count sources, tasks and skips, and keep
    the first `keep` images (as (image, masks, expressions, title)) for a grid."""
    from evfsam_lightning.data.datamodule import EvfDataModule

    dm = EvfDataModule(data, settings, rank=rank, world_size=world_size)
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


def _report(data: DataConfig, settings: PipelineSettings, result: dict[str, Any], samples: int, rank: int,
            world_size: int) -> str:
    weights = {s.name: s.weight for s in data.train}
    total_weight = sum(weights.values())
    lines = [f"realized mixture over {samples} images (rank {rank} of {world_size}, seed {settings.seed}, "
             f"mixing {data.mixing}):", f"  {'source':<20}{'weight':>8}{'target':>9}{'realized':>10}{'images':>8}"]
    for name, w in weights.items():
        n = result["sources"][name]
        lines.append(f"  {name:<20}{w:>8g}{100 * w / total_weight:>8.1f}%{100 * n / samples:>9.1f}%{n:>8}")
    lines.append(f"  {'task':<20}{'realized':>27}{'images':>8}")
    for task, n in sorted(result["tasks"].items()):
        lines.append(f"  {task:<20}{100 * n / samples:>26.1f}%{n:>8}")
    bad = {k: v for k, v in result["skips"].items() if v and k != "skipped"}
    lines.append("skipped: " + (", ".join(f"{k} {v}" for k, v in sorted(bad.items())) if bad else "none"))
    return "\n".join(lines)


def _data_for_recipe(path: str, overrides: Sequence[str]) -> tuple[DataConfig, PipelineSettings]:
    """The data module's inputs for a training recipe (+ overrides), as the run would build them."""
    from evfsam_lightning.config import ConfigError, load

    try:
        cfg = load(path, overrides)  # errors before the heavy imports below
    except ConfigError:
        if _in_former_dialect(path):
            raise ConfigError(f"{path}: a `data:` section with sources/tokenizer (the data module's own dialect) is "
                              "no longer read; pass a training recipe (data.train, data.val, model.tokenizer; e.g. "
                              "recipes/finetune_custom.yaml)") from None
        raise
    from evfsam_lightning.models.from_config import model_size
    from evfsam_lightning.training.data_setup import data_for_run
    from evfsam_lightning.training.run import resolve_pretrained

    cfg = resolve_pretrained(cfg)
    data, settings = data_for_run(cfg, model_size(cfg.model))
    # the images themselves, not an embedding cache's features (which may not be built yet)
    return dataclasses.replace(data, embedding_cache=None), settings


def _in_former_dialect(path: str) -> bool:
    """Whether `path` has a `data:` section in the data module's former dialect (sources, tokenizer)."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # the recipe loader's error says what is wrong
        return False
    data = doc.get("data") if isinstance(doc, dict) else None
    return isinstance(data, dict) and ("sources" in data or "tokenizer" in data)


@console_script("evfsam-data")
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `evfsam-data`."""
    parser = ArgumentParser(prog="evfsam-data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="realized source/task shares and a sample grid",
                                  description="Print the realized share of each source and task kind over N "
                                              "training images and optionally render a grid of samples.")
    inspect.add_argument("recipe", help="training recipe (see above)")
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
    data, settings = _data_for_recipe(args.recipe, args.overrides)
    result = realized_mixture(data, settings, args.samples, rank=args.rank, world_size=args.world_size,
                              keep=args.grid_images if args.grid else 0)
    print(_report(data, settings, result, args.samples, args.rank, args.world_size))
    if args.grid:
        render_grid(result["tiles"]).save(args.grid)
        print(f"grid of {len(result['tiles'])} images written to {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
