"""evfsam-cache-embeddings: run the frozen SAM image encoder once over a recipe's training shards.

    evfsam-cache-embeddings recipes/evfsam_refcoco.yaml --out cache/refcoco-sam-h [key=value ...]
    torchrun --nproc-per-node 8 -m evfsam_lightning.cli.cache RECIPE --out DIR   # shards split over ranks

Every sample of every training source, in shard order, goes through the recipe's model (its
pretrained SAM weights) and preprocessing; the image features are stored in bf16 per source and
shard, next to a manifest with the encoder fingerprint (see `data/embedding_cache.py`). Train on
them with `data.embedding_cache=DIR` (which needs `model.mode=frozen_image_encoder`): batches then
carry the features and the module skips the encoder. A cache built for other SAM weights or other
preprocessing is refused with the differences named.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from evfsam_lightning.cli.errors import ArgumentParser, console_script
from evfsam_lightning.config import ConfigError, load


def _encode(model, images: list, family: str, size: int, device: str, autocast: bool) -> list[dict]:
    import torch

    from evfsam_lightning.data.transforms import normalise_sam_pixels, sam_input_uint8

    canvases, hws = zip(*(sam_input_uint8(image, family, size) for image in images), strict=True)
    pixels = normalise_sam_pixels(torch.stack(canvases).to(device), torch.tensor(hws))
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        features = model.encode_images(pixels)
    features = {k: v.to("cpu", torch.bfloat16) for k, v in features.items()}
    return [{k: v[i] for k, v in features.items()} for i in range(len(images))]


def cache_shard(model, url: str, folder: Path, shard: int, *, family: str, size: int, device: str,
                autocast: bool, batch_size: int, skips) -> int:
    """Encode every decodable sample of one shard, in order; returns the number cached."""
    from evfsam_lightning.data import embedding_cache as ec
    from evfsam_lightning.data.examples import decode
    from evfsam_lightning.data.schema import SampleError
    from evfsam_lightning.data.stream import iter_shard

    writer = ec.ShardWriter(folder, shard)
    pending: list[tuple[str, object]] = []

    def flush() -> None:
        for (key, _), feats in zip(pending, _encode(model, [im for _, im in pending], family, size, device,
                                                     autocast), strict=True):
            writer.add(key, feats)
        pending.clear()

    for raw in iter_shard(url, skips):
        try:
            sample, image = decode(raw)
        except SampleError as e:
            skips.skip(e.reason, str(e))
            continue
        pending.append((sample.key, image))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return writer.close()


@console_script("evfsam-cache-embeddings")
def main(argv: list[str] | None = None) -> int:
    from argparse import RawDescriptionHelpFormatter

    p = ArgumentParser(prog="evfsam-cache-embeddings", description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="training recipe YAML: its model and training sources are used")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for evfsam-train")
    p.add_argument("--out", required=True, type=Path, help="cache folder (created; an existing manifest is replaced)")
    p.add_argument("--batch-size", type=int, default=8, help="images per encoder call")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("32", "bf16-mixed"), default=None,
                   help="encoder compute (default: bf16-mixed on a GPU, 32 on the CPU); stored as bf16 either way")
    args = p.parse_intermixed_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size} must be at least 1")
    cfg = load(args.recipe, args.overrides)
    if cfg.model.mode != "frozen_image_encoder":  # training would refuse the cache: say so before the work
        raise ConfigError(f"model.mode={cfg.model.mode!r} trains the SAM image encoder, so cached features would "
                          "be stale and training with data.embedding_cache refuses them (use a recipe with "
                          "model.mode=frozen_image_encoder)")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file, not a folder")
    import torch

    from evfsam_lightning.data import embedding_cache as ec

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (use --device cpu or auto)")

    from evfsam_lightning.data.skips import SkipLog
    from evfsam_lightning.data.stream import expand_urls
    from evfsam_lightning.models.from_config import build_configured_model, model_size
    from evfsam_lightning.training.data_setup import data_for_run
    from evfsam_lightning.training.run import resolve_pretrained

    cfg = resolve_pretrained(cfg)  # a missing file of model.pretrained, named; model.size=auto

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    precision = args.precision or ("bf16-mixed" if device == "cuda" else "32")
    if rank == 0:  # a cache being rebuilt is not valid until its new manifest is written
        (args.out / ec.MANIFEST).unlink(missing_ok=True)
    if world > 1:
        torch.distributed.init_process_group("gloo")  # only barriers: shards are split, not tensors
    data, _ = data_for_run(cfg, model_size(cfg.model))
    torch.manual_seed(cfg.seed)  # the initialisation a training run of this recipe starts from
    model = build_configured_model(cfg).to(device).eval()
    family, s = model.config.family, model.visual_model.image_size
    sources = {src.name: expand_urls(src.urls) for src in data.train}
    jobs = [(name, i, url) for name, urls in sources.items() for i, url in enumerate(urls)]
    skips = SkipLog(strict=data.strict)
    start = time.time()
    for n, (name, i, url) in enumerate(jobs):
        if n % world != rank:
            continue
        count = cache_shard(model, url, args.out / name, i, family=family, size=s, device=device,
                            autocast=precision == "bf16-mixed", batch_size=args.batch_size, skips=skips)
        print(f"[rank {rank}] {name} shard {i + 1}/{len(sources[name])}: {count} samples "
              f"({time.time() - start:.0f} s)", flush=True)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        counts = {name: [len(json.loads((args.out / name / f"{ec.shard_stem(i)}.json").read_text())["keys"])
                         for i in range(len(urls))] for name, urls in sources.items()}
        manifest = {
            "version": ec.CACHE_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "model": {"size": cfg.model.size, "family": family, "pretrained": cfg.model.pretrained,
                      "sam_checkpoint": cfg.model.sam_checkpoint},
            "encoder_fingerprint": ec.encoder_fingerprint(model.visual_model),
            "preprocessing": ec.preprocessing_fingerprint(family, s),
            "features": list(model.visual_model.image_feature_names), "dtype": "bfloat16", "precision": precision,
            "sources": {name: {"urls": urls, "samples": counts[name], "bytes": ec.shard_sizes(urls)}
                        for name, urls in sources.items()},
        }
        tmp = args.out / f".{ec.MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, args.out / ec.MANIFEST)
        total = sum(sum(c) for c in counts.values())
        print(f"cached {total} samples of {len(sources)} source(s) in {args.out} ({time.time() - start:.0f} s); "
              f"train with data.embedding_cache={args.out}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
