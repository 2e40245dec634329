"""The EVF-SAM model: BEiT-3 reads image and expression together; its first output token (the vision
CLS position), projected to the prompt width, prompts the SAM mask decoder.

Parameter names follow the official checkpoints: `mm_extractor.beit3.*`, `text_hidden_fcs.0.*`,
`visual_model.*` (the SAM part, renamed by the backbone where it uses transformers' modules).

Optional (`presence_head=True`, docs/no_target.md): `presence_head.*`, a small MLP on the same
fused feature giving one target/no-target logit per expression, with its decision threshold as a
buffer. It is not part of the reference model: the official-layout export leaves it out and writes
it to its own file (`checkpoints.PRESENCE_FILE`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from evfsam_lightning.data import transforms
from evfsam_lightning.models.beit3 import Beit3
from evfsam_lightning.models.sam import SamBackbone


@dataclass
class EvfOutput:
    """Per-expression outputs of a forward pass (N expressions over B images)."""

    low_res_logits: torch.Tensor  # (N, 1, 4h, 4w)
    iou_predictions: torch.Tensor  # (N, 1)
    logits: list[torch.Tensor] | None  # per image (n_i, H_i, W_i) at original resolution
    prompt_embeddings: torch.Tensor  # (N, 1, C)
    presence_logits: torch.Tensor | None = None  # (N,) with a presence head: > logit(threshold) = target


#: Logit given to every pixel of an expression the presence head rejects (an empty mask).
NO_TARGET_LOGIT = -100.0


class PresenceHead(nn.Module):
    """Target/no-target logit from the fused feature (N, 1, D) -> (N,). `threshold` (a probability)
    travels with the weights."""

    def __init__(self, dim: int, threshold: float = 0.5):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1))
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.mlp(fused[:, 0]).squeeze(-1)

    def present(self, logits: torch.Tensor) -> torch.Tensor:
        """Bool (N,): the score reaches the threshold."""
        return logits.float().sigmoid() >= self.threshold.float()


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype `module` computes in: that of its first floating parameter, as it is when the module
    runs. That is the engine's dtype under DeepSpeed bf16/fp16 and under `*-true` precisions, float32
    under autocast (which casts on its own), and under FSDP2 the mixed-precision policy's dtype while
    the module is unsharded (its policy has already cast the inputs of the sharded forward)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def to_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors cast to `dtype` (a no-op when they have it); others unchanged."""
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


class MultimodalExtractor(nn.Module):
    """Holds BEiT-3 under the name the official checkpoints use (`mm_extractor.beit3`)."""

    def __init__(self, beit3: Beit3):
        super().__init__()
        self.beit3 = beit3


class EvfSam(nn.Module):
    def __init__(self, *, beit3: Beit3, visual_model: SamBackbone, presence_head: bool = False):
        super().__init__()
        d, c = beit3.config.embed_dim, visual_model.prompt_dim
        self.mm_extractor = MultimodalExtractor(beit3)
        self.text_hidden_fcs = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, c))])
        self.visual_model = visual_model
        if presence_head:
            self.presence_head = PresenceHead(d)
        else:
            self.presence_head = None

    @property
    def beit3(self) -> Beit3:
        return self.mm_extractor.beit3

    @property
    def beit3_image_size(self) -> int:
        return self.beit3.config.image_size

    # -- stages -------------------------------------------------------------------------------
    # The model owns its input dtypes: each entry point casts what it is given (pixels made after
    # Lightning's precision cast, cached bf16 features, float32 from inference callers) to the dtype
    # its first layer computes in (`compute_dtype`), whatever the strategy and precision.
    def encode_images(self, sam_pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """SAM image features for a batch of preprocessed images (one per image, shared by all of
        its expressions)."""
        encoder = self.visual_model.vision_encoder
        return self.visual_model.encode_image(to_dtype(sam_pixel_values, compute_dtype(encoder)))

    def decoder_inputs(self, image_features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Image features (the encoder's, or an embedding cache's bf16 ones) in the mask decoder's dtype."""
        dtype = compute_dtype(self.visual_model.mask_decoder)
        return {k: to_dtype(v, dtype) for k, v in image_features.items()}

    def fusion_feature(self, beit_pixel_values: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """BEiT-3's output at position 0 (vision CLS of the fused sequence): (N, 1, D)."""
        dtype = compute_dtype(self.beit3.vision_embed)
        return self.beit3(to_dtype(beit_pixel_values, dtype), input_ids, attention_mask)[:, :1]

    def prompt_embeddings(self, beit_pixel_values: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected prompt token per expression: (N, 1, C)."""
        return self.text_hidden_fcs[0](self.fusion_feature(beit_pixel_values, input_ids, attention_mask))

    # -- training / batched forward -------------------------------------------------------------
    def forward(self, batch: dict, image_features: dict[str, torch.Tensor] | None = None,
                full_resolution: bool = True) -> EvfOutput:
        """Batched forward over B images and N expressions.

        `batch` holds `sam_pixel_values` (B,3,S,S), `beit_pixel_values` (B,3,224,224), `input_ids` and
        `attention_mask` (N,L), `image_index` (N,) and, for full-resolution logits, `resize_hw` and
        `original_hw` (B,2). Pass `image_features` to skip the SAM image encoder (frozen or cached)."""
        image_index = batch["image_index"]
        if image_features is None:
            image_features = self.encode_images(batch["sam_pixel_values"])
        image_features = self.decoder_inputs(image_features)
        beit_pixels = batch["beit_pixel_values"].index_select(0, image_index)
        fused = self.fusion_feature(beit_pixels, batch["input_ids"], batch.get("attention_mask"))
        prompt = self.text_hidden_fcs[0](fused)
        presence = self.presence_head(fused) if self.presence_head is not None else None
        low_res, iou = self.visual_model.decode(image_features, image_index, prompt.to(
            next(iter(image_features.values())).dtype))
        logits = None
        if full_resolution:
            counts = torch.bincount(image_index, minlength=batch["resize_hw"].shape[0]).tolist()
            logits = self.full_resolution_logits(low_res, counts, batch["original_hw"].tolist(),
                                                 batch["resize_hw"].tolist())
        return EvfOutput(low_res, iou, logits, prompt, presence)

    def apply_presence(self, logits: torch.Tensor, presence_logits: torch.Tensor | None) -> torch.Tensor:
        """(n, H, W) logits with every expression the presence head rejects set to an empty mask
        (`NO_TARGET_LOGIT`); unchanged without a head."""
        if self.presence_head is None or presence_logits is None:
            return logits
        keep = self.presence_head.present(presence_logits).to(logits.device)
        return torch.where(keep.view(-1, *([1] * (logits.dim() - 1))), logits,
                           logits.new_tensor(NO_TARGET_LOGIT))

    def full_resolution_logits(self, low_res: torch.Tensor, counts: list[int], original_hw: list,
                               resize_hw: list | None = None) -> list[torch.Tensor]:
        """Per image, the logits of its `counts[i]` expressions at its original size (n_i, H_i, W_i).
        Sizes are host integers; `resize_hw` defaults to the preprocessing's (`input_hw`)."""
        if resize_hw is None:
            resize_hw = [self.visual_model.input_hw(int(h), int(w)) for h, w in original_hw]
        return [self.visual_model.postprocess(chunk, resize_hw[i], original_hw[i])[:, 0]
                for i, chunk in enumerate(low_res.split(counts))]

    # -- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, image: np.ndarray, texts: str | list[str], tokenizer, max_length: int = 64,
                return_presence: bool = False):
        """Mask logits at the image's original size for one image and one or more expressions:
        (H, W) for a single string, (N, H, W) for a list. Binary mask = logits > 0.

        With a presence head, an expression scored below its threshold gets an empty mask ("no
        target"). `return_presence=True` returns (logits, scores): the presence probabilities, a
        float (single string) or (N,) tensor, None without a head."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        batch = collate_inference(self, image, texts, tokenizer, max_length)
        was_training = self.training
        self.eval()
        try:
            out = self(batch)
        finally:
            self.train(was_training)
        logits = self.apply_presence(out.logits[0], out.presence_logits)
        scores = out.presence_logits.float().sigmoid() if out.presence_logits is not None else None
        if single:
            logits, scores = logits[0], (float(scores[0]) if scores is not None else None)
        return (logits, scores) if return_presence else logits


def collate_inference(model: EvfSam, image: np.ndarray, texts: list[str], tokenizer,
                      max_length: int = 64) -> dict:
    """One image and its expressions as the batch dict `EvfSam.forward` reads."""
    from evfsam_lightning.data.tokenizer import tokenize

    device = next(model.parameters()).device
    sam_pixels, resize_hw = model.visual_model.preprocess(image)
    beit_pixels = transforms.beit3_preprocess(image, model.beit3_image_size)
    ids, mask = tokenize(tokenizer, texts, max_length)
    return {
        "sam_pixel_values": sam_pixels[None].to(device),
        "beit_pixel_values": beit_pixels[None].to(device),
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "image_index": torch.zeros(len(texts), dtype=torch.long, device=device),
        "resize_hw": torch.tensor([resize_hw]),
        "original_hw": torch.tensor([image.shape[:2]]),
    }
