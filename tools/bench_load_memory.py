"""Peak memory (RSS) of loading an EVF-SAM checkpoint folder, as `load_reference_folder` does now
(`assign`: the model built on the meta device takes the file's tensors) and as it did before
(`copy`: an allocated model plus the file's tensors, copied in).

    PYTHONPATH=. python tools/bench_load_memory.py --size evf-sam --work /tmp/loadmem
    PYTHONPATH=. python tools/bench_load_memory.py --size sam-b+beit3-base --work /tmp/loadmem --methods copy assign

The folder (fp32 `model.safetensors` under the official key names, config.json, a small tokenizer) is
written without ever holding the weights: the safetensors header is written from the meta model's
shapes and the data left as a sparse file of zeros, which reads back like any other. Each method runs
in a fresh process; the folder is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SIZES = {"evf-sam": "evf-sam", "evf-sam-beit3-base": "evf-sam-beit3-base"}


def _config(size: str):
    import dataclasses

    from evfsam_lightning.models.builders import BEIT3_BASE, SAM_VIT_B, model_config

    if size == "sam-b+beit3-base":
        return model_config({"family": "sam", "beit3": dataclasses.asdict(BEIT3_BASE),
                             "sam": dataclasses.asdict(SAM_VIT_B)})
    return model_config(size)


def write_folder(folder: Path, size: str) -> int:
    """A checkpoint folder of `size` with zero weights; returns the weights file's bytes."""
    from evfsam_lightning.data.tokenizer import build_tokenizer
    from evfsam_lightning.models import checkpoints as ck
    from evfsam_lightning.models.builders import build_model

    cfg = _config(size)
    model = build_model(cfg, device="meta")
    state = ck.to_reference(model, model.state_dict())
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, tensor in state.items():
        end = offset + math.prod(tensor.shape) * 4
        header[key] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ck.WEIGHTS_SAFETENSORS, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)  # sparse: zeros without writing them
    (folder / "config.json").write_text(json.dumps({"model_type": "evf", "architectures": ["EvfSamModel"],
                                                    "evfsam_lightning": {"model": cfg.to_dict()}}))
    build_tokenizer(["the red circle", "a blue square on the left"] * 20, folder, vocab_size=40)
    return offset


def measure(folder: Path, method: str) -> dict:
    """Load the folder once with `method`; peak RSS of this process."""
    import torch

    from evfsam_lightning.models import checkpoints as ck
    from evfsam_lightning.models.builders import build_model

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "assign":
        model, _ = ck.load_reference_folder(folder)
    else:  # the previous way: allocate the model, read the whole file, copy tensor by tensor
        model = build_model(ck.folder_model_config(folder), device="meta")
        model.to_empty(device="cpu")
        ck.load_reference_weights(model, folder / ck.WEIGHTS_SAFETENSORS)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    # Read every weight once, as inference does: memory-mapped pages count once they are touched.
    assert sum(int(torch.count_nonzero(t)) for t in model.state_dict().values()) == 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "parameters": params, "peak_rss_gib": round(peak / 2**20, 2),
            "rss_before_load_gib": round(base / 2**20, 2), "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="evf-sam", choices=[*SIZES, "sam-b+beit3-base"])
    p.add_argument("--work", type=Path, default=Path("/tmp/evfsam-loadmem"))
    p.add_argument("--methods", nargs="+", default=["assign"], choices=["assign", "copy"])
    p.add_argument("--keep", action="store_true")
    p.add_argument("--measure", choices=["assign", "copy"], help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    folder = args.work / args.size
    if args.measure:
        print(json.dumps(measure(folder, args.measure)))
        return 0
    weights = write_folder(folder, args.size)
    print(f"{folder}: {weights / 2**30:.2f} GiB of fp32 weights")
    try:
        for method in args.methods:
            out = subprocess.run([sys.executable, __file__, "--size", args.size, "--work", str(args.work),
                                  "--measure", method], capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
