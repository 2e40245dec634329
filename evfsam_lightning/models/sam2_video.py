"""EVF-SAM2 on video: a sentence prompts an object on one frame, SAM-2's memory tracks it through the clip.

The algorithm is the reference's (`EvfSam2Model.inference` on the SAM-2 video predictor of Sept. 2024),
re-expressed frame by frame so that frames can be read, encoded and released as they come:

- prompt frame: the image path on the video preprocessing (stride-16 features + `no_mem_embed`), the
  projected BEiT-3 token as the only sparse prompt, all mask tokens; its memory is encoded from the
  hole-filled mask, binarised (`(bilinear(mask, S) > 0) * 20 - 10`).
- tracked frame: memory attention of the stride-16 features (plus 0.1 x their sine position) over the
  memory bank: every prompt frame (temporal index 0), then up to `num_maskmem - 1` previous tracked
  frames at distance 6..1 in the direction of tracking (oldest first, features stored in bfloat16),
  then the object pointers of the prompt frames not in the future and of up to 15 previous tracked
  frames (nearest first), each split into C / mem_dim tokens without position; the decoder gets two
  "not a point" tokens; its memory is encoded from sigmoid(unfilled high-res mask) * 20 - 10.
- every frame: object score gating (logits -> -1024 where the score is <= 0), best-IoU mask, object
  pointer mixed with `no_obj_ptr` when absent, holes of <= 8 pixels (8-connected background at
  256 x 256) set to 0.1, bilinear resize to the video size; binary mask = logits > 0.

Several objects are tracked side by side (one state each), sharing every frame's image features.
Only the entries the bank can still reach are kept: memory stays bounded by the window, not the clip.

Over 350 lines on purpose: one algorithm (the reference's video inference) whose tracker and
text-prompted driver share the same per-object state; the SAM-2 memory modules are in sam2_memory.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

NO_OBJ_SCORE = -1024.0
#: SAM-2 video predictor settings EVF-SAM2 uses (sam2_hiera_l.yaml + build_sam2_video_predictor)
FILL_HOLE_AREA = 8
SIGMOID_SCALE_FOR_MEM_ENC = 20.0
SIGMOID_BIAS_FOR_MEM_ENC = -10.0
MAX_OBJ_PTRS = 16
#: ImageNet statistics of the video loader (on the [0, 1] scale)
VIDEO_MEAN = (0.485, 0.456, 0.406)
VIDEO_STD = (0.229, 0.224, 0.225)


# -- preprocessing ----------------------------------------------------------------------------------
def video_frame_preprocess(image: np.ndarray | Image.Image, image_size: int = 1024) -> torch.Tensor:
    """One frame as the reference video loader prepares it: Pillow resize to S x S (bicubic, aspect
    ratio not kept), /255 in float64, stored as float32, minus mean, divided by std in float32.
    (3, S, S). Differs from the image path (torch bilinear resize, 0-255 statistics)."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    resized = np.array(pil.convert("RGB").resize((image_size, image_size)))
    return normalise_video_frame(torch.from_numpy(resized).permute(2, 0, 1))


def normalise_video_frame(resized_uint8: torch.Tensor) -> torch.Tensor:
    """(3, S, S) or (N, 3, S, S) uint8, already resized -> normalised float32."""
    x = (resized_uint8.double() / 255.0).float()
    mean = torch.tensor(VIDEO_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(VIDEO_STD, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def fill_holes(mask: torch.Tensor, max_area: int = FILL_HOLE_AREA) -> torch.Tensor:
    """Background components (logit <= 0, 8-connected) of at most `max_area` pixels become 0.1.
    mask (N, 1, h, w)."""
    from scipy import ndimage

    if max_area <= 0:
        return mask
    background = (mask <= 0).cpu().numpy()
    holes = np.zeros_like(background)
    for i in range(background.shape[0]):
        labels, n = ndimage.label(background[i, 0], structure=np.ones((3, 3), dtype=bool))
        if n == 0:
            continue
        areas = np.bincount(labels.ravel())
        small = areas <= max_area
        small[0] = False
        holes[i, 0] = small[labels]
    return torch.where(torch.from_numpy(holes).to(mask.device), torch.tensor(0.1, dtype=mask.dtype), mask)


def _math_sdpa(device: torch.device):
    """The reference wraps its SAM-2 attention in `sdp_kernel(enable_flash=False, enable_math=True,
    enable_mem_efficient=True)`: on the CPU that is the math kernel. On CUDA, keep the default choice."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH]) if device.type == "cpu" else nullcontext()


# -- per-object state -------------------------------------------------------------------------------
@dataclass
class FrameResult:
    """One object on one frame. `video_logits` (H, W) at the video size, binary mask = > 0."""

    frame: int
    low_res_prefill: torch.Tensor  # (1, 1, h, w) selected, gated mask before hole filling
    low_res: torch.Tensor  # (1, 1, h, w) after hole filling
    video_logits: torch.Tensor  # (H, W)
    obj_ptr: torch.Tensor  # (1, C)
    object_score: torch.Tensor  # (1, 1)
    iou: torch.Tensor  # (1, K)
    best_index: int
    is_cond: bool
    extras: dict = field(default_factory=dict)
    #: (B, 1, h, w) the selected mask as the decoder gave it, before the object-score gating: what a trainer
    #: puts its mask loss on (a gated mask is a constant, without gradient)
    low_res_ungated: torch.Tensor | None = None


@dataclass
class ObjectTrack:
    """Tracking state of one object: its prompt, and the memory entries the bank may still use."""

    obj_id: int
    prompt_frame: int
    prompt: torch.Tensor  # (1, 1, C)
    cond: dict[int, dict] = field(default_factory=dict)
    non_cond: dict[int, dict] = field(default_factory=dict)

    def evict(self, frame: int, reverse: bool, keep: int = MAX_OBJ_PTRS) -> None:
        """Drop entries no later frame of this pass can reach (more than `keep` frames behind), except
        those near a prompt frame, which a pass in the other direction reads."""
        for t in list(self.non_cond):
            behind = (t - frame) if reverse else (frame - t)
            near_prompt = any(abs(t - c) < keep for c in self.cond)
            if behind >= keep and not near_prompt:
                del self.non_cond[t]


class Sam2VideoTracker:
    """The SAM-2 video algorithm on a `Sam2Backbone` (`models/sam2.py`), frame by frame."""

    def __init__(self, backbone, fill_hole_area: int = FILL_HOLE_AREA):
        self.vm = backbone
        self.mem = backbone.video_memory
        self.cfg = backbone.config
        self.fill_hole_area = fill_hole_area

    # -- features -------------------------------------------------------------------------------
    def frame_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(1, 3, S, S) preprocessed frame -> stride-16 features (raw, without `no_mem_embed`) and their
        sine position, and the decoder's high-resolution maps."""
        out = self.vm.vision_encoder(pixels)
        level0, level1, level2 = out.fpn_hidden_states
        return {"vision": level2, "vision_pos": out.fpn_position_encoding[-1].to(level2.dtype),
                "high_res_feat_s0": self.vm.mask_decoder.conv_s0(level0),
                "high_res_feat_s1": self.vm.mask_decoder.conv_s1(level1)}

    # -- one frame ------------------------------------------------------------------------------
    def _memory_bank(self, track: ObjectTrack, t: int, reverse: bool):
        mem, n = self.mem, self.cfg.num_maskmem
        spatial = [(0, track.cond[c]) for c in sorted(track.cond)]
        composition = [(c, 0) for c in sorted(track.cond)]
        for t_pos in range(1, n):
            t_rel = n - t_pos
            prev = t + t_rel if reverse else t - t_rel
            entry = track.non_cond.get(prev)
            if entry is not None:
                spatial.append((t_pos, entry))
                composition.append((prev, t_pos))
        feats, pos = [], []
        for t_pos, entry in spatial:
            feats.append(entry["maskmem_features"].flatten(2).transpose(1, 2))
            pos.append(entry["maskmem_pos_enc"].flatten(2).transpose(1, 2) + mem.maskmem_tpos_enc[n - t_pos - 1][0])
        ptrs = [track.cond[c]["obj_ptr"] for c in sorted(track.cond) if (c >= t if reverse else c <= t)]
        ptr_frames = [c for c in sorted(track.cond) if (c >= t if reverse else c <= t)]
        for t_diff in range(1, MAX_OBJ_PTRS):
            prev = t + t_diff if reverse else t - t_diff
            if prev < 0:
                break
            entry = track.non_cond.get(prev)
            if entry is not None:
                ptrs.append(entry["obj_ptr"])
                ptr_frames.append(prev)
        c, m = self.cfg.prompt_dim, self.cfg.mem_dim
        num_ptr_tokens = 0
        if ptrs:
            obj_ptrs = torch.stack(ptrs, dim=0)  # (P, B, C)
            b = obj_ptrs.shape[1]
            if m < c:
                obj_ptrs = obj_ptrs.reshape(-1, b, c // m, m).permute(0, 2, 1, 3).flatten(0, 1)
            obj_ptrs = obj_ptrs.transpose(0, 1)  # (B, P*k, m)
            feats.append(obj_ptrs)
            pos.append(torch.zeros_like(obj_ptrs))
            num_ptr_tokens = obj_ptrs.shape[1]
        memory = torch.cat(feats, dim=1).float()  # bfloat16 spatial memory promoted, as the reference's cat
        return memory, torch.cat(pos, dim=1), num_ptr_tokens, {"spatial": composition, "obj_ptrs": ptr_frames}

    def _encode_memory(self, feats: dict, high_res: torch.Tensor, from_prompt: bool) -> dict:
        """Memory of a frame from its high-res mask logits (1, 1, S, S)."""
        mask = (high_res > 0).float() if from_prompt else torch.sigmoid(high_res)
        mask = mask * SIGMOID_SCALE_FOR_MEM_ENC
        mask = mask + SIGMOID_BIAS_FOR_MEM_ENC
        features, pos = self.mem.memory_encoder(feats["vision"], mask)
        return {"maskmem_features": features.to(torch.bfloat16), "maskmem_pos_enc": pos,
                "maskmem_features_fp32": features}

    def step(self, feats: dict, track: ObjectTrack, t: int, reverse: bool, video_hw: tuple[int, int],
             keep_extras: bool = False, store_memory: bool = True) -> FrameResult:
        """Run one frame for one object (the prompt frame when `t == track.prompt_frame` and it has no
        memory yet) and store its memory entry (`store_memory=False`: not encoded, e.g. a training clip's
        last frame). The mask decoder and the memory attention run SDPA on the math backend where the
        device allows, as the reference's video predictor does."""
        with _math_sdpa(feats["vision"].device):
            return self._step(feats, track, t, reverse, video_hw, keep_extras, store_memory)

    def _step(self, feats: dict, track: ObjectTrack, t: int, reverse: bool, video_hw: tuple[int, int],
              keep_extras: bool, store_memory: bool = True) -> FrameResult:
        vm, c = self.vm, self.cfg.prompt_dim
        is_cond = t == track.prompt_frame and t not in track.cond
        extras: dict = {}
        vision = feats["vision"]
        b, _, h, w = vision.shape
        if is_cond:
            pix = vision + vm.no_memory_embedding.reshape(1, -1, 1, 1)
            sparse = track.prompt.reshape(b, 1, c)
        else:
            memory, memory_pos, num_ptr, composition = self._memory_bank(track, t, reverse)
            curr = vision.flatten(2).transpose(1, 2)
            curr_pos = feats["vision_pos"].flatten(2).transpose(1, 2).expand(b, -1, -1)
            out = self.mem.memory_attention(curr, curr_pos, memory, memory_pos, num_ptr, (h, w))
            pix = out.transpose(1, 2).reshape(b, c, h, w)
            not_a_point = vm.prompt_encoder.not_a_point_embed.weight.reshape(1, 1, c)
            sparse = not_a_point.expand(b, 2, c)
            extras["memory_composition"] = composition
        extras["pix_feat_with_mem"] = pix
        decoder_feats = {"image_embeddings": pix, "high_res_feat_s0": feats["high_res_feat_s0"],
                         "high_res_feat_s1": feats["high_res_feat_s1"]}
        index = torch.arange(b, device=pix.device)  # object i reads its own frame features (a batch of objects)
        masks, iou, tokens, score = vm.mask_decoder_outputs(decoder_feats, index, sparse, multimask_output=True)
        masks = masks.float()
        ungated = masks
        appearing = score > 0
        masks = torch.where(appearing[:, :, None, None], masks, torch.tensor(NO_OBJ_SCORE, dtype=masks.dtype))
        size = self.cfg.image_size
        high_res_all = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)
        best = iou.argmax(dim=-1)
        rows = torch.arange(b, device=masks.device)
        low_res = masks[rows, best][:, None]
        high_res = high_res_all[rows, best][:, None]
        obj_ptr = self.mem.obj_ptr_proj(tokens[rows, best])
        lam = appearing.float()
        obj_ptr = lam * obj_ptr
        obj_ptr = obj_ptr + (1 - lam) * self.mem.no_obj_ptr
        filled = fill_holes(low_res, self.fill_hole_area)
        if store_memory:
            if is_cond:
                # The memory of a prompt frame is encoded later (propagation preflight) from its FILLED mask.
                high_res_mem = F.interpolate(filled, size=(size, size), mode="bilinear", align_corners=False)
                memory_entry = self._encode_memory(feats, high_res_mem, from_prompt=True)
            else:
                memory_entry = self._encode_memory(feats, high_res, from_prompt=False)
            fp32 = memory_entry.pop("maskmem_features_fp32")
            memory_entry["obj_ptr"] = obj_ptr
            (track.cond if is_cond else track.non_cond)[t] = memory_entry
        video_logits = F.interpolate(filled, size=tuple(video_hw), mode="bilinear", align_corners=False)[0, 0]
        if keep_extras:
            extras.update(sam_output_tokens=tokens, multimask_logits=masks)
            if store_memory:
                extras.update(maskmem_features_fp32=fp32, maskmem_features_bf16=memory_entry["maskmem_features"],
                              maskmem_pos_enc=memory_entry["maskmem_pos_enc"])
        else:
            extras = {}
        return FrameResult(t, low_res, filled, video_logits, obj_ptr, score, iou, int(best[0]), is_cond, extras,
                           ungated[rows, best][:, None])


# -- the clip-level API ---------------------------------------------------------------------------
@dataclass
class ObjectPrompt:
    """An object to track: its text prompt embedding (1, 1, C) given on `frame`."""

    obj_id: int
    frame: int
    prompt: torch.Tensor


def processing_order(num_frames: int, start: int, reverse: bool) -> list[int]:
    """Frames of one propagation pass from `start`, as the reference's `propagate_in_video`."""
    if reverse:
        return list(range(start, -1, -1)) if start > 0 else []
    return list(range(start, num_frames))


class EvfSam2Video:
    """Text-prompted video object segmentation with an EVF-SAM2 model (`EvfSam` with a SAM-2 backbone).

        video = EvfSam2Video(model, tokenizer)
        for frame, logits in video.track(frames, ["the dog", "the ball"], prompt_frame=10, direction="both"):
            ...  # logits: {obj_id: (H, W)} at the video size; mask = logits > 0

    `frames` is a `FrameSource` (models/video_io.py) or a list of RGB uint8 arrays. Each object has
    its own prompt frame (one text each); all objects share every frame's image features."""

    def __init__(self, model, tokenizer=None, max_length: int = 64):
        if getattr(model.visual_model, "family", None) != "sam2":
            raise ValueError("video tracking needs an EVF-SAM2 model (SAM-2 backbone)")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.tracker = Sam2VideoTracker(model.visual_model)
        self.tracks: list[ObjectTrack] = []

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def text_prompt(self, frame_rgb: np.ndarray, text: str | None = None, input_ids: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The projected BEiT-3 token (1, 1, C) of `text` (or token ids) read together with a frame."""
        from evfsam_lightning.data import transforms

        if input_ids is None:
            if self.tokenizer is None:
                raise ValueError("a tokenizer is needed to prompt with text")
            from evfsam_lightning.data.tokenizer import tokenize

            input_ids, attention_mask = tokenize(self.tokenizer, [text], self.max_length)
        beit = transforms.beit3_preprocess(np.asarray(frame_rgb), self.model.beit3_image_size)[None]
        dtype = next(self.model.parameters()).dtype
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        return self.model.prompt_embeddings(beit.to(self.device, dtype), ids, mask)

    @torch.no_grad()
    def track(self, frames, texts: Iterable[str] = (), prompt_frame: int | list[int] = 0,
              direction: str = "forward", prompts: list[ObjectPrompt] | None = None
              ) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
        """Yield (frame index, {obj_id: video-size logits (H, W)}) frame by frame, each frame once:
        with `direction` "both", the forward pass from the earliest prompt frame, then the backward
        pass from the latest. An object has no mask (all NO_OBJ_SCORE) on frames its passes do not
        reach from its own prompt frame."""
        from evfsam_lightning.models.video_io import as_frame_source

        if direction not in ("forward", "backward", "both"):
            raise ValueError(f"direction must be forward, backward or both (got {direction!r})")
        source = as_frame_source(frames)
        n = len(source)
        texts = list(texts)
        if prompts is None:
            frames_of = prompt_frame if isinstance(prompt_frame, list) else [prompt_frame] * len(texts)
            if len(frames_of) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(frames_of)} prompt frames")
            prompts = []
            for i, (text, f) in enumerate(zip(texts, frames_of, strict=True)):
                if not 0 <= f < n:
                    raise ValueError(f"prompt frame {f} is outside the clip (0..{n - 1})")
                prompts.append(ObjectPrompt(i + 1, f, self.text_prompt(source.rgb(f), text)))
        if not prompts:
            raise ValueError("no object to track: give at least one text")
        tracks = [ObjectTrack(p.obj_id, p.frame, p.prompt.to(self.device)) for p in prompts]
        self.tracks = tracks  # the live states, for inspection
        passes = []
        if direction in ("forward", "both"):
            passes.append((min(t.prompt_frame for t in tracks), False))
        if direction in ("backward", "both"):
            passes.append((max(t.prompt_frame for t in tracks), True))
        done: set[int] = set()
        for start, reverse in passes:
            for t in processing_order(n, start, reverse):
                results = self.step_frame(source, t, tracks, reverse)
                if t in done:
                    continue
                done.add(t)
                yield t, results

    def step_frame(self, source, t: int, tracks: list[ObjectTrack], reverse: bool,
                   keep_extras: bool = False) -> dict[int, torch.Tensor] | dict[int, FrameResult]:
        h, w = source.video_hw
        dtype = next(self.model.parameters()).dtype
        pixels = source.pixels(t, self.model.visual_model.image_size)[None].to(self.device, dtype)
        feats = self.tracker.frame_features(pixels)
        results = {}
        for track in tracks:
            active = t <= track.prompt_frame if reverse else t >= track.prompt_frame
            if not active:
                if not keep_extras:
                    results[track.obj_id] = torch.full((h, w), NO_OBJ_SCORE, device=pixels.device)
                continue
            if t == track.prompt_frame and t in track.cond:
                # the prompt frame again (second pass): its stored output, no recomputation
                results[track.obj_id] = track.cond[t]["video_logits"]
                continue
            r = self.tracker.step(feats, track, t, reverse, (h, w), keep_extras=keep_extras)
            if r.is_cond:
                track.cond[t]["video_logits"] = r.video_logits
            track.evict(t, reverse)
            results[track.obj_id] = r if keep_extras else r.video_logits
        return results
