#!/usr/bin/env python
"""Check our EVF-SAM against a parity fixture of the reference implementation.

    python tools/check_parity.py ../shared/fixtures/evfsam_parity_a

Reads the fixture's manifest.json, builds the model from its dimensions, loads weights.safetensors
through the public checkpoint loader, runs preprocessing, inference, the training forward with the
loss, and the backward, and prints one row per compared tensor. Exit status 0 only if all pass.

    python tools/check_parity.py ../shared/fixtures/evfsam_parity_a --onnx

exports the same model with `evfsam_lightning.deploy.onnx` (both families) to a temporary folder
and checks the two onnxruntime graphs and the predictor's pre/postprocessing instead: the fixture's
expression, and its padded multi-expression training batch through the same graph.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from evfsam_lightning.data import transforms
from evfsam_lightning.models.builders import build_model
from evfsam_lightning.models.checkpoints import load_reference_weights
from evfsam_lightning.models.parity import beit3_config_from_manifest, check_text_path, check_training

FLOAT_TOL = 1e-4
LOSS_RTOL = 1e-5


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str, bool]] = []

    def exact(self, name: str, ours, golden) -> None:
        ours, golden = torch.as_tensor(ours), torch.as_tensor(golden)
        same = ours.shape == golden.shape and torch.equal(ours.to(golden.dtype), golden)
        diff = (ours.double() - golden.double()).abs().max().item() if ours.shape == golden.shape else float("inf")
        self.rows.append((name, diff, "exact", same))

    def close(self, name: str, ours: torch.Tensor, golden: torch.Tensor, tol: float = FLOAT_TOL) -> None:
        ours = ours.detach().double().reshape(golden.shape) if ours.numel() == golden.numel() else ours.detach()
        ok_shape = tuple(ours.shape) == tuple(golden.shape)
        diff = (ours - golden.double()).abs().max().item() if ok_shape else float("inf")
        self.rows.append((name, diff, f"abs {tol:g}", ok_shape and diff <= tol))

    def relative(self, name: str, ours: torch.Tensor, golden: torch.Tensor, rtol: float = LOSS_RTOL) -> None:
        g = golden.double().item()
        diff = abs(ours.detach().double().item() - g) / max(abs(g), 1e-12)
        self.rows.append((name, diff, f"rel {rtol:g}", diff <= rtol))

    def mask(self, name: str, ours: torch.Tensor, golden: torch.Tensor, logits: torch.Tensor, tol: float) -> None:
        """Binary masks may differ only where the golden logit is within `tol` of the threshold."""
        differ = ours.to(torch.uint8) != golden.to(torch.uint8)
        bad = int((differ & (logits.abs() >= tol)).sum())
        self.rows.append((name, float(differ.sum()), f"only |logit|<{tol:g}", bad == 0))

    def print(self) -> bool:
        width = max(len(r[0]) for r in self.rows)
        print(f"{'tensor':<{width}}  {'max diff':>12}  {'tolerance':<18}  result")
        for name, diff, tol, ok in self.rows:
            print(f"{name:<{width}}  {diff:>12.3e}  {tol:<18}  {'pass' if ok else 'FAIL'}")
        failed = [r[0] for r in self.rows if not r[3]]
        print(f"{len(self.rows) - len(failed)} passed, {len(failed)} failed")
        return not failed


def model_config_from_manifest(manifest: dict) -> dict:
    """Our model config dict from a fixture manifest's `architecture` section."""
    arch = manifest["architecture"]
    ie, pe, md = arch["sam_image_encoder"], arch["sam_prompt_encoder"], arch["sam_mask_decoder"]
    sam = {
        "image_size": ie["img_size"], "patch_size": ie["patch_size"], "encoder_dim": ie["embed_dim"],
        "encoder_depth": ie["depth"], "encoder_heads": ie["num_heads"],
        "global_attn_indexes": list(ie["global_attn_indexes"]), "window_size": ie["window_size"],
        "mlp_ratio": ie["mlp_ratio"], "prompt_dim": md["transformer_dim"],
        "decoder_depth": md["transformer"]["depth"], "decoder_heads": md["transformer"]["num_heads"],
        "decoder_mlp_dim": md["transformer"]["mlp_dim"], "iou_head_depth": md["iou_head_depth"],
        "iou_head_hidden_dim": md["iou_head_hidden_dim"], "num_multimask_outputs": md["num_multimask_outputs"],
        "mask_in_chans": pe["mask_in_chans"],
    }
    return {"family": "sam", "beit3": beit3_config_from_manifest(manifest), "sam": sam}


def check_sam1(fixture: Path, manifest: dict, report: Report) -> None:
    io = load_file(str(fixture / "io.safetensors"))
    inter = load_file(str(fixture / "intermediates.safetensors")) if (fixture / "intermediates.safetensors").is_file() else {}
    model = build_model(model_config_from_manifest(manifest))
    load_reference_weights(model, fixture / "weights.safetensors")
    model.eval()
    vm = model.visual_model
    image = io["image_rgb_uint8"].numpy()

    # Preprocessing
    sam_pixels, resize_hw = vm.preprocess(image)
    beit_pixels = transforms.beit3_preprocess(image, model.beit3_image_size)
    report.exact("original_size_hw", torch.tensor(image.shape[:2]), io["original_size_hw"])
    report.exact("sam_resize_hw", torch.tensor(resize_hw), io["sam_resize_hw"])
    if "sam_resized_uint8" in inter:
        resized = np.array(Image.fromarray(image).resize((resize_hw[1], resize_hw[0]), Image.BILINEAR))
        report.exact("sam_resized_uint8", torch.from_numpy(resized), inter["sam_resized_uint8"])
    report.exact("sam_pixel_values", sam_pixels[None], io["sam_pixel_values"])
    report.exact("beit_pixel_values", beit_pixels[None], io["beit_pixel_values"])

    # Inference (the reference's inference(): no padding, multimask off)
    with torch.no_grad():
        feats = model.encode_images(io["sam_pixel_values"])
        report.close("image_embeddings", feats["image_embeddings"], io["image_embeddings"])
        ids = io["input_ids"]
        beit_out = model.beit3(io["beit_pixel_values"], ids, io["attention_mask"].bool())
        prompt = check_text_path(model, beit_out, io, inter, report)
        h, w = feats["image_embeddings"].shape[-2:]
        dense = vm.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w)
        report.close("dense_embeddings", dense, io["dense_embeddings"])
        if "image_pe" in inter:
            report.close("image_pe", vm.image_positional_encoding(h, w), inter["image_pe"])
        index = torch.zeros(1, dtype=torch.long)
        low_res, iou = vm.decode(feats, index, prompt)
        report.close("low_res_masks", low_res, io["low_res_masks"])
        report.close("iou_predictions", iou, io["iou_predictions"])
        multi_low, multi_iou = vm.decode(feats, index, prompt, multimask_output=True)
        report.close("low_res_masks_all", torch.cat([low_res, multi_low], 1), io["low_res_masks_all"])
        report.close("iou_predictions_all", torch.cat([iou, multi_iou], 1), io["iou_predictions_all"])
        logits = vm.postprocess(low_res, resize_hw, image.shape[:2])[:, 0]
        report.close("mask_logits", logits, io["mask_logits"])
        report.mask("pred_mask", (logits[0] > 0), io["pred_mask"], io["mask_logits"][0], FLOAT_TOL)

    # Training forward + loss + backward (SAM frozen, as the fixture's reference run)
    check_training(model, io, manifest, report, io["sam_resize_hw"])


def fixture_family(manifest: dict) -> str:
    """The SAM family of a fixture, `sam` or `sam2`: its `family` field, else (S2A has none) SAM-2
    when the model is an EvfSam2Model or the architecture describes a Hiera trunk."""
    arch = manifest.get("architecture", {})
    family = manifest.get("family") or arch.get("family")
    if family is None:
        family = "sam2" if "hiera" in arch or "Sam2" in manifest.get("model", "") else "sam"
    return "sam" if family == "sam1" else family


#: golden names of the image features, by our feature name (SAM-2 fixtures say `image_embed`)
_FEATURE_GOLDEN = {"image_embeddings": ("image_embeddings", "image_embed")}


def check_onnx(fixture: Path, manifest: dict, family: str, report: Report) -> None:
    """The fixture's model exported to ONNX and run by onnxruntime through `OnnxPredictor`."""
    import tempfile

    from evfsam_lightning.deploy.onnx import OnnxPredictor, export_onnx

    io = load_file(str(fixture / "io.safetensors"))
    if family == "sam":
        config = model_config_from_manifest(manifest)
    else:
        from evfsam_lightning.models.parity_sam2 import model_config_from_manifest as sam2_config

        config = sam2_config(manifest)
    model = build_model(config)
    load_reference_weights(model, fixture / "weights.safetensors")
    model.eval()
    with tempfile.TemporaryDirectory(prefix="evfsam-onnx-") as tmp:
        out = export_onnx(model, tmp)
        del model
        predictor = OnnxPredictor(out)
        image = io["image_rgb_uint8"].numpy()
        sam, beit, resize_hw = predictor.preprocess(image)
        if "sam_resize_hw" in io:
            report.exact("sam_resize_hw", torch.tensor(resize_hw), io["sam_resize_hw"])
        report.exact("sam_pixel_values", torch.from_numpy(sam), io["sam_pixel_values"])
        report.exact("beit_pixel_values", torch.from_numpy(beit), io["beit_pixel_values"])
        feats = predictor.encode_image(io["sam_pixel_values"].numpy())
        for name, value in feats.items():
            golden = next((g for g in (*_FEATURE_GOLDEN.get(name, ()), name) if g in io), None)
            if golden is not None:
                report.close(f"onnx.{golden}", torch.from_numpy(value), io[golden])
        low_res, iou = predictor.decode(feats, io["beit_pixel_values"].numpy(), io["input_ids"].numpy(),
                                        io["attention_mask"].bool().numpy())
        report.close("onnx.low_res_masks", torch.from_numpy(low_res), io["low_res_masks"])
        if "iou_predictions" in io:
            report.close("onnx.iou_predictions", torch.from_numpy(iou), io["iou_predictions"])
        logits = predictor.postprocess(low_res, resize_hw, image.shape[:2])
        report.close("onnx.mask_logits", torch.from_numpy(logits), io["mask_logits"])
        report.mask("onnx.pred_mask", torch.from_numpy(logits[0] > 0), io["pred_mask"], io["mask_logits"][0],
                    FLOAT_TOL)
        # Several expressions of different lengths (padded) through the same graph: the training
        # batch, whose expressions all belong to the fixture image
        n = int(io["train_offset"][-1])
        low_res, _ = predictor.decode(feats, io["beit_pixel_values"].numpy(), io["train_input_ids"][:n].numpy(),
                                      io["train_attention_masks"][:n].bool().numpy())
        report.close("onnx.train_low_res_masks", torch.from_numpy(low_res), io["train_low_res_masks"][:n])


def run(fixture: Path, onnx: bool = False) -> bool:
    fixture = Path(fixture)
    manifest = json.loads((fixture / "manifest.json").read_text())
    family = fixture_family(manifest)
    torch.manual_seed(0)
    report = Report()
    from evfsam_lightning.models.parity_video import is_video_fixture

    if is_video_fixture(manifest):
        if onnx:
            raise SystemExit("check_parity: --onnx does not cover video fixtures (the memory path is not exported)")
        from evfsam_lightning.models.parity_video import check_parity_video

        family = "sam2 video"
        check_parity_video(fixture, manifest, report)
    elif onnx:
        check_onnx(fixture, manifest, family, report)
    elif family == "sam":
        check_sam1(fixture, manifest, report)
    else:
        from evfsam_lightning.models.parity_sam2 import check_parity_sam2

        check_parity_sam2(fixture, manifest, report)
    print(f"fixture {fixture} ({manifest.get('fixture', '?')}, family {family})")
    return report.print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixture", type=Path, help="fixture folder with manifest.json, weights/io safetensors")
    parser.add_argument("--onnx", action="store_true",
                        help="export the model to ONNX and check the onnxruntime graphs and predictor instead")
    args = parser.parse_args(argv)
    return 0 if run(args.fixture, onnx=args.onnx) else 1


if __name__ == "__main__":
    sys.exit(main())
