"""Parity check of EVF-SAM2 against a fixture of the reference `EvfSam2Model` (schema of fixture S2A).

`check_parity_sam2` builds the model from the manifest's dimensions, loads `weights.safetensors`
through the public loader and writes one report row per golden tensor it can reproduce:
preprocessing (exact), Hiera / FPN / BEiT-3 / mask-decoder intermediates, image features with the
high-resolution maps, prompt, all mask tokens and IoUs, the selected mask and its index, logits,
binary mask, and the training step (loss, projector gradients). Rows exist only for tensors the
fixture holds; an intermediate stored for a band of rows (`<name>_rows<a>_<b>`) is compared there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from evfsam_lightning.data import transforms
from evfsam_lightning.models.builders import build_model
from evfsam_lightning.models.checkpoints import load_reference_weights
from evfsam_lightning.models.parity import (
    ParityReport,
    beit3_config_from_manifest,
    check_text_path,
    check_training,
)

#: binary masks may differ only where the golden logit is closer than this to the threshold
PRED_MASK_TOL = 1e-4
_ROWS = re.compile(r"^(?P<base>.+?)_rows(?P<start>\d+)_(?P<stop>\d+)$")


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(f"fixture manifest: {what} is not supported by the SAM-2 backbone")


def model_config_from_manifest(manifest: dict) -> dict:
    """Our model config dict (family `sam2`) from a SAM-2 fixture manifest's `architecture` section
    (and, for the memory modules' frame count and fuser depth, its resolved Hydra config)."""
    arch = manifest["architecture"]
    hiera, neck, md, pe = arch["hiera"], arch["fpn_neck"], arch["sam_mask_decoder"], arch["sam_prompt_encoder"]
    c = arch["hidden_dim_C"]
    _expect(neck["d_model"] == c and md["transformer_dim"] == c and pe["embed_dim"] == c,
            "FPN / prompt / decoder widths that differ")
    _expect(neck.get("fpn_interp_model", "nearest") == "nearest" and neck.get("fuse_type", "sum") == "sum",
            "an FPN top-down path other than nearest + sum")
    _expect(neck.get("scalp", 1) == 1, "scalp != 1")
    _expect(arch.get("backbone_stride", 16) == 16, "a backbone stride other than 16")
    _expect(md.get("use_high_res_features", True) and md.get("iou_prediction_use_sigmoid", True),
            "a decoder without high-res features or sigmoid IoU")
    q_stride = hiera.get("q_stride", [2, 2])
    _expect(q_stride[0] == q_stride[1], "a non-square q_stride")
    memory = arch.get("memory_modules", {})
    model = manifest.get("hydra", {}).get("resolved_config", {}).get("model", {})
    fuser = model.get("memory_encoder", {}).get("fuser", {})
    sam = {
        "image_size": arch["image_size"], "embed_dim": hiera["embed_dim"], "num_heads": hiera["num_heads"],
        "dim_mul": hiera.get("dim_mul", 2.0), "head_mul": hiera.get("head_mul", 2.0),
        "stages": list(hiera["stages"]), "global_attn_blocks": list(hiera["global_att_blocks"]),
        "window_spec": list(hiera["window_spec"]),
        "window_pos_embed_bkg_size": list(hiera["window_pos_embed_bkg_spatial_size"]),
        "mlp_ratio": hiera.get("mlp_ratio", 4.0), "q_pool": len(hiera["q_pool_blocks"]), "q_stride": q_stride[0],
        "prompt_dim": c, "fpn_top_down_levels": list(neck["fpn_top_down_levels"]),
        "decoder_depth": md["transformer"]["depth"], "decoder_heads": md["transformer"]["num_heads"],
        "decoder_mlp_dim": md["transformer"]["mlp_dim"], "iou_head_depth": md["iou_head_depth"],
        "iou_head_hidden_dim": md["iou_head_hidden_dim"], "num_multimask_outputs": md["num_multimask_outputs"],
        "mask_in_chans": pe["mask_in_chans"], "mem_dim": arch["mem_dim"],
        "num_maskmem": model.get("num_maskmem", 7),
        "memory_attention_layers": memory.get("memory_attention_layers")
        or memory["memory_attention"]["num_layers"],
        "memory_attention_ffn_dim": memory.get("memory_attention_ffn")
        or memory["memory_attention"]["dim_feedforward"],
        "memory_fuser_layers": fuser.get("num_layers", 2),
    }
    return {"family": "sam2", "beit3": beit3_config_from_manifest(manifest), "sam": sam}


@contextmanager
def _capture(outputs: dict[str, nn.Module], inputs: dict[str, nn.Module]) -> Iterator[dict[str, list]]:
    """Record every output of the modules in `outputs` and the first positional input of those in
    `inputs`, by name, while the block runs."""
    seen: dict[str, list] = {name: [] for name in [*outputs, *inputs]}
    handles = [m.register_forward_hook(lambda _m, _a, out, n=name: seen[n].append(out)) for name, m in outputs.items()]
    handles += [m.register_forward_pre_hook(lambda _m, args, n=name: seen[n].append(args[0]))
                for name, m in inputs.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _compare_rows(report: ParityReport, golden: dict[str, torch.Tensor], ours: dict[str, tuple[torch.Tensor, int]]) -> None:
    """Rows for the golden tensors named `<base>` or `<base>_<note>` / `<base>_rows<a>_<b>` for each
    `base` in `ours` ((tensor, row dim)); a band of rows is sliced along the row dim."""
    for name in sorted(golden):
        match = _ROWS.match(name)
        base = match["base"] if match else name
        key = base if base in ours else next((k for k in ours if base.startswith(k + "_")), None)
        if key is None:
            continue
        tensor, row_dim = ours[key]
        if match:
            tensor = tensor.narrow(row_dim, int(match["start"]), int(match["stop"]) - int(match["start"]))
        report.close(name, tensor, golden[name])


def check_parity_sam2(fixture: Path, manifest: dict, report: ParityReport) -> None:
    """Compare our EVF-SAM2 with the fixture in `fixture` (see the module docstring)."""
    fixture = Path(fixture)
    io = load_file(str(fixture / "io.safetensors"))
    inter_file = fixture / "intermediates.safetensors"
    inter = load_file(str(inter_file)) if inter_file.is_file() else {}
    model = build_model(model_config_from_manifest(manifest))
    load_reference_weights(model, fixture / "weights.safetensors")
    model.eval()
    vm = model.visual_model
    image = io["image_rgb_uint8"].numpy()
    size = vm.image_size

    # Structure: per Hiera block (dim, dim_out, heads, window, q_stride) as the manifest lists them
    if "blocks" in manifest["architecture"]["hiera"]:
        golden = [[b["dim"], b["dim_out"], b["heads"], b["window"], (b["q_stride"] or [0])[0]]
                  for b in manifest["architecture"]["hiera"]["blocks"]]
        ours = [[b.dim, b.dim_out, b.attn.num_attention_heads, b.window_size, (b.query_stride or [0])[0]]
                for b in vm.vision_encoder.backbone.blocks]
        report.exact("hiera.block_layout", torch.tensor(ours), torch.tensor(golden))

    # Preprocessing
    sam_pixels, resize_hw = vm.preprocess(image)
    beit_pixels = transforms.beit3_preprocess(image, model.beit3_image_size)
    report.exact("original_size_hw", torch.tensor(image.shape[:2]), io["original_size_hw"])
    if "sam_resized_uint8" in inter:
        report.exact("sam_resized_uint8", transforms.sam2_resize(image, size)[None], inter["sam_resized_uint8"])
    report.exact("sam_pixel_values", sam_pixels[None], io["sam_pixel_values"])
    report.exact("beit_pixel_values", beit_pixels[None], io["beit_pixel_values"])

    with torch.no_grad():
        # Image path, with Hiera and FPN intermediates
        trunk = vm.vision_encoder.backbone
        with _capture({"patch_embed": trunk.patch_embed, "trunk": trunk, "neck": vm.vision_encoder.neck},
                      {"block0_input": trunk.blocks[0]}) as seen:
            feats = model.encode_images(io["sam_pixel_values"])
        levels = seen["neck"][0][0]  # lowest resolution first
        ours = {"hiera.patch_embed": (seen["patch_embed"][0], 1), "hiera.block0_input": (seen["block0_input"][0], 1)}
        for i, stage in enumerate(seen["trunk"][0].intermediate_hidden_states):
            ours[f"hiera.stage{i + 1}"] = (stage.permute(0, 3, 1, 2), 2)
        for j, level in enumerate(reversed(levels)):
            ours[f"neck.level{j}"] = (level, 2)
        _compare_rows(report, inter, ours)
        report.close("image_embed", feats["image_embeddings"], io["image_embed"])
        report.close("high_res_feat_s0", feats["high_res_feat_s0"], io["high_res_feat_s0"])
        report.close("high_res_feat_s1", feats["high_res_feat_s1"], io["high_res_feat_s1"])
        h, w = feats["image_embeddings"].shape[-2:]
        if "image_pe" in inter:
            report.close("image_pe", vm.image_positional_encoding(h, w), inter["image_pe"])

        # Text path, with BEiT-3 intermediates
        layers = model.beit3.encoder.layers
        with _capture({f"beit3.layer_{i}": layer for i, layer in enumerate(layers)},
                      {"beit3.embedding_out": layers[0]}) as seen:
            beit_out = model.beit3(io["beit_pixel_values"], io["input_ids"], io["attention_mask"].bool())
        _compare_rows(report, inter, {name: (outs[0], 1) for name, outs in seen.items()})
        prompt = check_text_path(model, beit_out, io, inter, report)

        # Mask decoder: every mask token, the selection, with the decoder's intermediates
        index = torch.zeros(1, dtype=torch.long)
        decoder = vm.mask_decoder
        hyper = {f"hyper_{i}": mlp for i, mlp in enumerate(decoder.output_hypernetworks_mlps)}
        with _capture({"transformer": decoder.transformer, "activation": decoder.activation, **hyper}, {}) as seen:
            multi_low, multi_iou, tokens, object_score = vm.mask_decoder_outputs(feats, index, prompt)
        queries, keys = seen["transformer"][0]
        hyper_in = torch.stack([seen[name][0] for name in hyper], dim=2)
        _compare_rows(report, inter, {
            "mask_decoder.transformer_hs": (queries[:, 0], 1), "mask_decoder.transformer_src": (keys[:, 0], 1),
            "mask_decoder.upscaled_stage1": (seen["activation"][0], 2),
            "mask_decoder.upscaled_embedding": (seen["activation"][1], 2),
            "mask_decoder.hyper_in": (hyper_in[:, 0], 1),
        })
        single_low, single_iou, _, _ = vm.mask_decoder_outputs(feats, index, prompt, multimask_output=False)
        report.close("low_res_masks_all", torch.cat([single_low, multi_low], 1), io["low_res_masks_all"])
        report.close("iou_predictions_all", torch.cat([single_iou, multi_iou], 1), io["iou_predictions_all"])
        report.close("multimask_iou_predictions", multi_iou, io["multimask_iou_predictions"])
        report.close("sam_output_tokens", tokens, io["sam_output_tokens"])
        report.close("object_score_logits", object_score, io["object_score_logits"])
        report.exact("best_mask_index", multi_iou.argmax(dim=1), io["best_mask_index"])
        low_res, _ = vm.decode(feats, index, prompt)
        report.close("low_res_masks", low_res, io["low_res_masks"])
        logits = vm.postprocess(low_res, resize_hw, image.shape[:2])[:, 0]
        report.close("mask_logits", logits, io["mask_logits"])
        report.mask("pred_mask", logits[0] > 0, io["pred_mask"], io["mask_logits"][0], PRED_MASK_TOL)

    # Training forward + loss + backward (all of SAM-2 frozen, as the reference run)
    out, train_feats, image_index = check_training(model, io, manifest, report, torch.tensor([size, size]))
    with torch.no_grad():
        _, train_iou = vm.decode(train_feats, image_index, out.prompt_embeddings, multimask_output=True)
    report.close("train_iou_predictions", train_iou, io["train_iou_predictions"])
    report.exact("train_best_mask_index", train_iou.argmax(dim=1), io["train_best_mask_index"])
