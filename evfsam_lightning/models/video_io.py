"""Frame sources for video tracking: a folder of frames, a video file (PyAV), or arrays in memory.

A source decodes one frame when asked and keeps none: memory does not grow with the clip. Frames of a
folder are ordered as the reference's loader orders them (by the integer file stem, else by name).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evfsam_lightning.config import ConfigError

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class FrameSource:
    """Random access to RGB uint8 frames (H, W, 3) of one clip."""

    video_hw: tuple[int, int]

    def __len__(self) -> int:
        raise NotImplementedError

    def pil(self, index: int) -> Image.Image:
        raise NotImplementedError

    def rgb(self, index: int) -> np.ndarray:
        return np.asarray(self.pil(index).convert("RGB"))

    def pixels(self, index: int, image_size: int) -> torch.Tensor:
        """The frame preprocessed as the reference video loader does: (3, S, S) float32."""
        from evfsam_lightning.models.sam2_video import video_frame_preprocess

        return video_frame_preprocess(self.pil(index), image_size)


def _frame_key(path: Path):
    try:
        return (0, int(path.stem), path.name)
    except ValueError:
        return (1, 0, path.name)


class FolderFrames(FrameSource):
    """A folder of image files, one per frame (JPEG as the reference, or PNG/BMP/WebP)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"{folder}: no such frame folder")
        self.files = sorted((p for p in self.folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_frame_key)
        if not self.files:
            raise ConfigError(f"{folder}: no frames ({'/'.join(FRAME_SUFFIXES)} files) in the folder")
        with Image.open(self.files[0]) as im:
            self.video_hw = (im.height, im.width)

    def __len__(self) -> int:
        return len(self.files)

    def pil(self, index: int) -> Image.Image:
        try:
            with Image.open(self.files[index]) as im:
                im = im.convert("RGB")
        except OSError as e:
            raise ConfigError(f"{self.files[index]}: cannot read frame ({e})") from e
        if (im.height, im.width) != self.video_hw:
            raise ConfigError(f"{self.files[index]}: frame size {im.height}x{im.width} differs from the first "
                              f"frame's {self.video_hw[0]}x{self.video_hw[1]}")
        return im


class ArrayFrames(FrameSource):
    """Frames already in memory (a list of (H, W, 3) uint8 arrays or a (N, H, W, 3) array)."""

    def __init__(self, frames):
        self.frames = frames
        if len(frames) == 0:
            raise ConfigError("the clip has no frames")
        self.video_hw = tuple(np.asarray(frames[0]).shape[:2])

    def __len__(self) -> int:
        return len(self.frames)

    def pil(self, index: int) -> Image.Image:
        return Image.fromarray(np.asarray(self.frames[index], dtype=np.uint8))


class VideoFileFrames(FrameSource):
    """A video file decoded with PyAV (`pip install av`). Frames are decoded in order as they are
    asked for; asking for an earlier frame re-opens the file and decodes up to it, so a backward pass
    costs a decode per frame but never holds more than one frame."""

    def __init__(self, path: str | os.PathLike):
        try:
            import av  # noqa: F401
        except ImportError as e:
            raise ConfigError("reading a video file needs PyAV: pip install av (or give a folder of frames)") from e
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"{path}: no such video file")
        self._container = None
        self._iter = None
        self._next = 0
        count = 0
        hw = None
        try:
            for frame in self._frames():  # one cheap pass to count the frames (stream.frames is often 0)
                if hw is None:
                    hw = (frame.height, frame.width)
                count += 1
        except Exception as e:  # PyAV raises its own error types for unreadable input
            raise ConfigError(f"{path}: cannot decode the video ({e})") from e
        if count == 0:
            raise ConfigError(f"{path}: the video has no frames")
        self._len, self.video_hw = count, hw
        self._close()

    def _frames(self):
        import av

        self._close()
        self._container = av.open(str(self.path))
        return self._container.decode(video=0)

    def _close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container, self._iter, self._next = None, None, 0

    def __len__(self) -> int:
        return self._len

    def pil(self, index: int) -> Image.Image:
        if not 0 <= index < self._len:
            raise IndexError(index)
        if self._iter is None or index < self._next:
            self._iter = self._frames()
        while True:
            frame = next(self._iter)
            self._next += 1
            if self._next - 1 == index:
                return frame.to_image().convert("RGB")


def as_frame_source(frames) -> FrameSource:
    if isinstance(frames, FrameSource):
        return frames
    if isinstance(frames, (str, os.PathLike)):
        path = Path(frames)
        return FolderFrames(path) if path.is_dir() else VideoFileFrames(path)
    return ArrayFrames(frames)
