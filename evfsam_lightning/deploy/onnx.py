"""ONNX export of EVF-SAM / EVF-SAM2 and a small onnxruntime predictor.

Two graphs, written by `export_onnx(model, out_dir)` (`evfsam-export --format onnx`):

- `image_encoder.onnx`: `sam_pixel_values` (B, 3, S, S) -> the SAM image features (SAM-1:
  `image_embeddings`; SAM-2 also `high_res_feat_s0`, `high_res_feat_s1`), once per image.
- `text_decoder.onnx`: one image's features (batch 1), `beit_pixel_values` (1, 3, 224, 224),
  `input_ids` and `attention_mask` (N, L) -> `low_res_logits` (N, 1, 4h, 4w) and
  `iou_predictions` (N, 1): BEiT-3, the projector, the prompt encoder and the mask decoder. N
  (expressions) and L (tokens) are dynamic axes.

`onnx_config.json` beside them records the model family, sizes and the graph names, and the
tokenizer files are copied in, so the folder is all `OnnxPredictor` needs. The predictor runs the
package's own preprocessing and postprocessing (Pillow / torch CPU ops, identical to
`EvfSam.predict`) around the two onnxruntime sessions; numpy in, numpy out.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from evfsam_lightning.config import ConfigError

IMAGE_ENCODER = "image_encoder.onnx"
TEXT_DECODER = "text_decoder.onnx"
CONFIG = "onnx_config.json"
OPSET = 18
#: graphs whose weights pass this size keep them in `<graph>.onnx.data` (protobuf stops at 2 GiB)
EXTERNAL_DATA_BYTES = 1 << 30


def _require(module: str, extra: str = "onnx"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"ONNX export/inference needs `{module}`: pip install -e \".[{extra}]\"") from e


def check_export_available() -> None:
    """Raise a `ConfigError` naming the extra when the exporter's packages are missing (before a
    model is loaded)."""
    _require("onnx")
    _require("onnxscript")


class ImageEncoderGraph(nn.Module):
    """The SAM image encoder, features returned as a tuple in `image_feature_names` order."""

    def __init__(self, model):
        super().__init__()
        self.visual_model = model.visual_model

    def forward(self, sam_pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.visual_model.encode_image(sam_pixel_values)
        return tuple(feats[k] for k in self.visual_model.image_feature_names)


class TextDecoderGraph(nn.Module):
    """BEiT-3 + projector + prompt encoder + mask decoder for N expressions of one image."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, beit_pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                *features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vm = self.model.visual_model
        n = input_ids.shape[0]
        index = torch.zeros_like(input_ids[:, 0])
        beit = beit_pixel_values.expand(n, -1, -1, -1)
        prompt = self.model.prompt_embeddings(beit, input_ids, attention_mask.bool())
        feats = dict(zip(vm.image_feature_names, features, strict=True))
        return vm.decode(feats, index, prompt.to(features[0].dtype))


def _dummy_inputs(model, n: int, length: int):
    s = model.visual_model.image_size
    b = model.beit3_image_size
    pixels = torch.randn(2, 3, s, s)  # a batch of 2: a size-1 example would be specialised
    with torch.no_grad():
        feats = ImageEncoderGraph(model)(pixels[:1])
    ids = torch.randint(3, model.beit3.config.vocab_size, (n, length))
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[0, -1] = False  # a padded position: the masked attention path is what gets exported
    return pixels, (torch.randn(1, 3, b, b), ids, mask, *feats)


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def export_onnx(model, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                opset: int = OPSET, external_data: bool | None = None, verbose: bool = False) -> Path:
    """Write the two graphs, `onnx_config.json` and the tokenizer files to `out_dir`. The model is
    exported in float32 on the CPU (a copy is not made: the model is moved and put in eval mode).
    `external_data` (default: for graphs over `EXTERNAL_DATA_BYTES` of weights, as full-size
    models) writes the weights beside a graph in `<graph>.onnx.data`."""
    check_export_available()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu().eval()
    vm = model.visual_model
    names = list(vm.image_feature_names)
    pixels, text_inputs = _dummy_inputs(model, n=2, length=7)
    image_graph, text_graph = ImageEncoderGraph(model).eval(), TextDecoderGraph(model).eval()
    external = {g: _weight_bytes(g) > EXTERNAL_DATA_BYTES if external_data is None else external_data
                for g in (image_graph, text_graph)}
    # The exporter's notes about ops we do not use (torchvision) and axis names are noise here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")
        warnings.filterwarnings("ignore", category=UserWarning, message=".*axis name")
        torch.onnx.export(image_graph, (pixels,), str(out / IMAGE_ENCODER), dynamo=True,
                          input_names=["sam_pixel_values"], output_names=names, opset_version=opset,
                          dynamic_shapes={"sam_pixel_values": {0: torch.export.Dim("batch", min=1)}},
                          external_data=external[image_graph], verbose=verbose)
        n, length = torch.export.Dim("expressions", min=1), torch.export.Dim("tokens", min=2,
                                                                              max=model.beit3.config.max_text_positions - 2)
        dynamic = ({}, {0: n, 1: length}, {0: n, 1: length}, tuple({} for _ in names))  # *features
        torch.onnx.export(text_graph, text_inputs, str(out / TEXT_DECODER), dynamo=True,
                          input_names=["beit_pixel_values", "input_ids", "attention_mask", *names],
                          output_names=["low_res_logits", "iou_predictions"], opset_version=opset,
                          dynamic_shapes=dynamic, external_data=external[text_graph], verbose=verbose)
    config = {
        "family": vm.family, "image_size": vm.image_size, "beit3_image_size": model.beit3_image_size,
        "image_feature_names": names, "image_encoder": IMAGE_ENCODER, "text_decoder": TEXT_DECODER,
        "opset": opset, "model": model.config.to_dict() if hasattr(model, "config") else None,
    }
    (out / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    if tokenizer_dir is not None:
        from evfsam_lightning.models.checkpoints import TOKENIZER_FILES

        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    return out


class OnnxPredictor:
    """onnxruntime inference of an exported folder, reproducing `EvfSam.predict`.

        predictor = OnnxPredictor("exported/onnx")
        logits = predictor.predict(image_rgb_uint8, ["the man on the left", "[semantic] sky"])  # (2, H, W)
        masks = logits > 0
    """

    def __init__(self, folder: str | os.PathLike, providers: list[str] | None = None, tokenizer=None):
        ort = _require("onnxruntime")
        self.folder = Path(folder)
        config_path = self.folder / CONFIG
        if not config_path.is_file():
            raise ConfigError(f"{config_path} not found: not an ONNX export (evfsam-export --format onnx)")
        self.config = json.loads(config_path.read_text())
        for key in ("image_encoder", "text_decoder"):
            if not (self.folder / self.config[key]).is_file():
                raise ConfigError(f"{self.folder / self.config[key]} not found (ONNX export incomplete)")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        providers = providers or ["CPUExecutionProvider"]
        self.image_session = ort.InferenceSession(str(self.folder / self.config["image_encoder"]), options,
                                                  providers=providers)
        self.text_session = ort.InferenceSession(str(self.folder / self.config["text_decoder"]), options,
                                                 providers=providers)
        self.family = self.config["family"]
        self.image_size = int(self.config["image_size"])
        self.beit3_image_size = int(self.config["beit3_image_size"])
        self.feature_names = list(self.config["image_feature_names"])
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from evfsam_lightning.data.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.folder)
        return self._tokenizer

    # -- stages (numpy in, numpy out) -------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """SAM pixels (1, 3, S, S), BEiT-3 pixels (1, 3, 224, 224) and the SAM resize (h', w'):
        the same functions as the torch model."""
        from evfsam_lightning.data import transforms

        if self.family == "sam":
            sam, resize_hw = transforms.sam_preprocess(image, self.image_size)
        else:
            sam, resize_hw = transforms.sam2_preprocess(image, self.image_size)
        beit = transforms.beit3_preprocess(image, self.beit3_image_size)
        return sam[None].numpy(), beit[None].numpy(), resize_hw

    def encode_image(self, sam_pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.image_session.run(self.feature_names, {"sam_pixel_values": sam_pixel_values.astype(np.float32)})
        return dict(zip(self.feature_names, outs, strict=True))

    def decode(self, features: dict[str, np.ndarray], beit_pixel_values: np.ndarray, input_ids: np.ndarray,
               attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Low-res logits (N, 1, 4h, 4w) and IoU predictions (N, 1) for one image's expressions."""
        feeds = {"beit_pixel_values": beit_pixel_values.astype(np.float32), "input_ids": input_ids.astype(np.int64),
                 "attention_mask": attention_mask.astype(bool)}
        feeds.update({k: features[k] for k in self.feature_names})
        low_res, iou = self.text_session.run(["low_res_logits", "iou_predictions"], feeds)
        return low_res, iou

    def postprocess(self, low_res: np.ndarray, resize_hw, original_hw) -> np.ndarray:
        """Low-res logits (N, 1, 4h, 4w) -> logits at the original size (N, H, W)."""
        from evfsam_lightning.data import transforms

        x = torch.from_numpy(np.ascontiguousarray(low_res)).float()
        out = transforms.postprocess_masks(x, resize_hw, original_hw, self.image_size, padded=self.family == "sam")
        return out[:, 0].numpy()

    def predict(self, image: np.ndarray, texts: str | list[str], max_length: int = 64) -> np.ndarray:
        """Mask logits at the image's original size: (H, W) for one string, (N, H, W) for a list.
        Binary mask = logits > 0."""
        from evfsam_lightning.data.tokenizer import tokenize

        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        sam, beit, resize_hw = self.preprocess(image)
        ids, mask = tokenize(self.tokenizer, texts, max_length)
        low_res, _ = self.decode(self.encode_image(sam), beit, ids.numpy(), mask.numpy())
        logits = self.postprocess(low_res, resize_hw, image.shape[:2])
        return logits[0] if single else logits
