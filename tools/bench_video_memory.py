#!/usr/bin/env python
"""Peak memory of evfsam-predict-video against clip length: streaming must keep it flat.

    python tools/bench_video_memory.py --frames 100 1000 [--device cuda] [--model tiny-sam2]
        [--frame-size 64] [--image-size S] [--threads 1]

For each length N, a synthetic clip (a square moving across a `--frame-size` square frame, JPEG) is
written to a folder and `evfsam-predict-video` (its `predict_video` function, in a fresh process) tracks
one text forward through it with a random model of `--model`'s shape (`--image-size` overrides its SAM-2
input size; the frames are resized to it, so the clip's own size barely matters). The child reports its
peak RSS (ru_maxrss), peak CUDA memory (when on CUDA), the most memory entries the tracker held at any
frame and at the end. The last line compares the longest clip with the shortest: within 10% is the
target. One torch thread by default: on a shared CPU, extra threads mostly wait for each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _clip(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    side = max(4, size // 4)
    for t in range(n):
        img = np.full((size, size, 3), 235, dtype=np.uint8)
        x = t % (size - side)
        img[size // 3:size // 3 + side, x:x + side] = (220, 30, 30)
        Image.fromarray(img).save(folder / f"{t:05d}.jpg", quality=90)


def child(args) -> None:
    import torch

    from evfsam_lightning.cli.predict_video import predict_video
    from evfsam_lightning.data.tokenizer import build_tokenizer
    from evfsam_lightning.models.builders import build_model, model_config
    from evfsam_lightning.models.sam2_video import EvfSam2Video

    work = Path(args.work)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = build_tokenizer(["the red square", "the blue circle"] * 10, work / "tok", vocab_size=48)
    from evfsam_lightning.data.tokenizer import load_tokenizer

    cfg = model_config(args.model)
    if args.image_size:
        cfg.sam = dataclasses.replace(cfg.sam, image_size=args.image_size)
    model = build_model(cfg).to(args.device).eval()
    tokenizer = load_tokenizer(tok)
    held = {}
    orig = EvfSam2Video.track

    def track(self, *a, **k):  # record how many memory entries the tracker holds, at most and at the end
        for item in orig(self, *a, **k):
            held["entries"] = sum(len(t.non_cond) + len(t.cond) for t in self.tracks)
            held["max"] = max(held.get("max", 0), held["entries"])
            yield item

    EvfSam2Video.track = track
    start = time.perf_counter()
    predict_video(model, tokenizer, str(work / "frames"), ["the red square"], [0], "forward", work / "masks",
                  progress=False)
    out = {"frames": args.child, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "seconds": time.perf_counter() - start, "memory_entries_max": held.get("max"), "memory_entries_at_end": held.get("entries"),
           "image_size": model.visual_model.image_size, "frame_size": args.frame_size, "threads": args.threads}
    if args.device.startswith("cuda"):
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="tiny-sam2")
    p.add_argument("--frame-size", type=int, default=64, help="side of the synthetic square frames")
    p.add_argument("--image-size", type=int, default=None, help="SAM-2 input size (default: the model's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the tracking process")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(args)
        return 0
    rows = []
    for n in args.frames:
        with tempfile.TemporaryDirectory() as work:
            _clip(Path(work) / "frames", n, args.frame_size)
            extra = ["--image-size", str(args.image_size)] if args.image_size else []
            proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--work", work, "--device",
                                   args.device, "--model", args.model, "--frame-size", str(args.frame_size),
                                   "--threads", str(args.threads), *extra], capture_output=True, text=True,
                                  env={"PYTHONPATH": str(REPO), **__import__("os").environ})
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]))
    first, last = rows[0], rows[-1]
    ratio = last["peak_rss_mib"] / first["peak_rss_mib"]
    print(f"peak RSS {last['frames']} frames / {first['frames']} frames = {ratio:.3f} "
          f"({'within' if ratio <= 1.10 else 'OVER'} 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
