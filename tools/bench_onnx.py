#!/usr/bin/env python
"""Time the ONNX export and onnxruntime inference against the torch model (BENCHMARKS.md).

    python tools/bench_onnx.py ../shared/fixtures/evfsam_parity_a --work /tmp/bench-onnx

Builds the fixture's model (its weights), exports it with `evfsam_lightning.deploy.onnx`, then times
the image encoder and the text-prompted decoder (3 expressions) in torch and in onnxruntime on the
fixture's inputs (median of --repeats runs after one warm-up)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_parity import fixture_family, model_config_from_manifest  # noqa: E402

from evfsam_lightning.deploy.onnx import OnnxPredictor, export_onnx  # noqa: E402
from evfsam_lightning.models.builders import build_model  # noqa: E402
from evfsam_lightning.models.checkpoints import load_reference_weights  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fixture", type=Path)
    p.add_argument("--work", type=Path, required=True, help="folder for the exported graphs")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    manifest = json.loads((args.fixture / "manifest.json").read_text())
    if fixture_family(manifest) == "sam":
        config = model_config_from_manifest(manifest)
    else:
        from evfsam_lightning.models.parity_sam2 import model_config_from_manifest as sam2_config

        config = sam2_config(manifest)
    model = build_model(config)
    load_reference_weights(model, args.fixture / "weights.safetensors")
    model.eval()
    t = time.perf_counter()
    export_onnx(model, args.work)
    print(f"export: {time.perf_counter() - t:.1f} s")
    io = load_file(str(args.fixture / "io.safetensors"))
    predictor = OnnxPredictor(args.work)
    pixels, beit = io["sam_pixel_values"], io["beit_pixel_values"]
    ids = io["train_input_ids"].repeat(2, 1)[:3]
    mask = io["train_attention_masks"].repeat(2, 1)[:3].bool()
    index = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        feats = model.encode_images(pixels)

        def torch_decode():
            prompt = model.prompt_embeddings(beit.expand(3, -1, -1, -1), ids, mask)
            model.visual_model.decode(feats, index, prompt)

        rows = {"image encoder": (lambda: model.encode_images(pixels),
                                  lambda: predictor.encode_image(pixels.numpy())),
                "text decoder (3 expressions)": (torch_decode, lambda: predictor.decode(
                    {k: v.numpy() for k, v in feats.items()}, beit.numpy(), ids.numpy(), mask.numpy()))}
        print(f"torch threads: {torch.get_num_threads()}")
        for name, (ours, onnx) in rows.items():
            print(f"{name}: torch {median_seconds(ours, args.repeats) * 1e3:.1f} ms, "
                  f"onnxruntime {median_seconds(onnx, args.repeats) * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
