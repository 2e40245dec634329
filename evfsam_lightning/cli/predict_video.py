"""evfsam-predict-video: segment and track what sentences refer to through a video, with EVF-SAM2.

    evfsam-predict-video --checkpoint CHECKPOINT --video clip.mp4 --text "the dog" [--text "the ball"] \
        [--prompt-frame N] [--reverse | --both] --out masks/ [--overlay overlay.mp4]
    evfsam-predict-video --demo --out demo/      # tiny random EVF-SAM2 on a generated clip, no files needed

--video is a video file (decoded with PyAV) or a folder of frames (JPEG/PNG, ordered by frame number).
Each text is one object, prompted on --prompt-frame (one value, or one per text) and tracked forward
(default), backward (--reverse) or both ways (--both). Frames are read, encoded and released one at a
time, and each frame's mask is written as soon as it is computed: out/00000.png ... (0/255 for one
object; for several, one indexed PNG per frame whose value is the object's number, 1 = first text,
later texts drawn over earlier ones). CHECKPOINT: an EVF-SAM2 training checkpoint or a folder in the
official layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evfsam_lightning.cli.errors import (
    ArgumentParser,
    UserError,
    checkpoint_input,
    console_script,
    output_path,
)

DEMO_TEXT = "the red square"
#: palette of the indexed PNGs and overlay colours: background black, then one colour per object
PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60)]


def _demo(folder: Path) -> tuple[Path, Path]:
    """A tiny random EVF-SAM2 exported in the official layout, and a generated frame folder."""
    from evfsam_lightning.data.tokenizer import build_tokenizer
    from evfsam_lightning.models.builders import build_model
    from evfsam_lightning.models.checkpoints import export_reference

    torch.manual_seed(0)
    tok_dir = build_tokenizer([DEMO_TEXT, "the blue circle", "the green triangle on the left"] * 10,
                              folder / "tokenizer", vocab_size=48)
    ckpt = export_reference(build_model("tiny-sam2"), folder / "tiny-sam2-random", tokenizer_dir=tok_dir)
    frames = folder / "frames"
    frames.mkdir(parents=True, exist_ok=True)
    for t in range(8):
        img = np.full((72, 96, 3), 235, dtype=np.uint8)
        img[20:44, 8 + 6 * t:32 + 6 * t] = (220, 30, 30)
        Image.fromarray(img).save(frames / f"{t:05d}.jpg", quality=95)
    return ckpt, frames


def _mask_image(masks: dict[int, np.ndarray]) -> Image.Image:
    if len(masks) == 1:
        return Image.fromarray(next(iter(masks.values())).astype(np.uint8) * 255)
    index = np.zeros(next(iter(masks.values())).shape, dtype=np.uint8)
    for obj_id in sorted(masks):
        index[masks[obj_id]] = obj_id
    img = Image.fromarray(index, mode="P")
    img.putpalette([c for rgb in PALETTE for c in rgb] + [255] * 3 * (256 - len(PALETTE)))
    return img


def write_overlay(source, mask_dir: Path, out: Path, fps: float = 10.0) -> None:
    """Frames with their masks drawn over them, as a video (PyAV), one frame in memory at a time."""
    try:
        import av
    except ImportError as e:
        raise UserError("--overlay needs PyAV (pip install av)") from e
    h, w = source.video_hw
    out.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(out), "w") as container:
        stream = container.add_stream("mpeg4", rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        for t in range(len(source)):
            frame = source.rgb(t).astype(np.float32)
            index = np.asarray(Image.open(mask_dir / f"{t:05d}.png"))
            ids = (index > 0).astype(np.uint8) if index.max() == 255 else index
            for obj_id in np.unique(ids[ids > 0]):
                colour = np.array(PALETTE[int(obj_id) % len(PALETTE) or 1], dtype=np.float32)
                sel = ids == obj_id
                frame[sel] = 0.5 * frame[sel] + 0.5 * colour
            rgb = frame[: h - h % 2, : w - w % 2].astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def predict_video(model, tokenizer, video, texts: list[str], prompt_frames: list[int], direction: str,
                  out: Path, progress: bool = True) -> dict[int, int]:
    """Track and write one PNG per frame as it comes; returns {obj_id: frames where it is present}."""
    from evfsam_lightning.config import ConfigError
    from evfsam_lightning.models.sam2_video import EvfSam2Video
    from evfsam_lightning.models.video_io import as_frame_source

    source = as_frame_source(video)
    n = len(source)
    for f in prompt_frames:
        if not 0 <= f < n:
            raise ConfigError(f"--prompt-frame {f} is outside the clip {video} (frames 0..{n - 1})")
    tracker = EvfSam2Video(model, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    present = {i + 1: 0 for i in range(len(texts))}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="frame", desc="tracking", file=sys.stderr)
    for t, logits in tracker.track(source, texts, prompt_frames, direction=direction):
        masks = {obj_id: (lg > 0).cpu().numpy() for obj_id, lg in logits.items()}
        for obj_id, m in masks.items():
            present[obj_id] += int(m.any())
        _mask_image(masks).save(out / f"{t:05d}.png")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return present


@console_script("evfsam-predict-video")
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="evfsam-predict-video", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="EVF-SAM2 training checkpoint or folder in the official layout")
    p.add_argument("--video", help="video file or folder of frames")
    p.add_argument("--text", action="append", default=[], help="a referring expression (repeat for more objects)")
    p.add_argument("--prompt-frame", type=int, action="append", default=None,
                   help="frame the texts are read on (default 0; one value, or one per --text)")
    way = p.add_mutually_exclusive_group()
    way.add_argument("--reverse", action="store_true", help="track backward from the prompt frame")
    way.add_argument("--both", action="store_true", help="track forward, then backward from the prompt frame")
    p.add_argument("--out", required=True, help="folder for the per-frame mask PNGs")
    p.add_argument("--overlay", help="also write the video with the masks drawn over it (.mp4)")
    p.add_argument("--fps", type=float, default=10.0, help="frame rate of --overlay")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--demo", action="store_true", help="tiny random EVF-SAM2 + generated clip (smoke test)")
    args = p.parse_args(argv)

    out = output_path(args.out, folder=True)
    if args.overlay:
        output_path(args.overlay, "--overlay")
    if any(not t.strip() for t in args.text):
        raise UserError("--text is empty (give the referring expression, e.g. --text \"the dog\")")
    if args.demo:
        ckpt, video = _demo(out / "demo_checkpoint")
        texts = args.text or [DEMO_TEXT]
        out = out / "masks"
    else:
        missing = [f"--{n}" for n in ("checkpoint", "video") if not getattr(args, n)] + ([] if args.text else ["--text"])
        if missing:
            p.error(f"missing {', '.join(missing)} (or use --demo)")
        ckpt, video, texts = args.checkpoint, args.video, [t.strip() for t in args.text]
        if not Path(video).exists():
            raise UserError(f"--video {video}: no such file or folder (check the path)")
    frames = args.prompt_frame or [0]
    if len(frames) == 1:
        frames = frames * len(texts)
    if len(frames) != len(texts):
        raise UserError(f"{len(texts)} --text but {len(frames)} --prompt-frame (give one, or one per text)")
    from evfsam_lightning.models.video_io import as_frame_source

    source = as_frame_source(video)  # reads the folder / probes the file before the model is built
    for f in frames:
        if not 0 <= f < len(source):
            raise UserError(f"--prompt-frame {f} is outside the clip {video} (frames 0..{len(source) - 1})")
    if not args.demo:
        checkpoint_input(ckpt)
    from evfsam_lightning.training.loading import load_for_inference

    model, tokenizer = load_for_inference(ckpt, args.device)
    if getattr(model.visual_model, "family", None) != "sam2":
        raise UserError(f"--checkpoint {ckpt}: video tracking needs an EVF-SAM2 model (this one is EVF-SAM)")
    model.eval()
    direction = "backward" if args.reverse else "both" if args.both else "forward"
    present = predict_video(model, tokenizer, source, texts, frames, direction, out, progress=not args.no_progress)
    if args.overlay:
        write_overlay(source, out, Path(args.overlay), args.fps)
    for i, text in enumerate(texts):
        print(f"{text!r}: present on {present[i + 1]} of {len(source)} frames")
    print(f"masks -> {out}" + (f", overlay -> {args.overlay}" if args.overlay else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
