"""The Gradio demo behind `evfsam-demo`: an image (uploaded or picked from the examples), one or
more expressions (one per line, optionally `[semantic]`), the masks overlaid on the image and
offered for download as PNG files.

Runs offline: analytics are switched off before Gradio is imported, the theme uses system fonts
(Gradio's default theme would fetch Google Fonts), and server-side rendering (a Node server) is off.
"""

from __future__ import annotations

import html
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from evfsam_lightning.config import ConfigError

#: mask colours (RGB) of the overlay, in expression order
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                    (70, 240, 240), (240, 50, 230), (210, 245, 60)], dtype=np.float32)
ALPHA = 0.5
SEMANTIC = "[semantic] "

Predict = Callable[[np.ndarray, list[str]], np.ndarray]  # (H, W, 3) uint8, N texts -> (N, H, W) logits


def import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as e:
        raise ConfigError('evfsam-demo needs gradio: pip install -e ".[demo]"') from e
    return gradio


def expressions(text: str, semantic: bool) -> list[str]:
    """One expression per non-empty line; `[semantic] ` prefixed when ticked (and not already there)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if semantic:
        lines = [line if line.startswith(SEMANTIC.strip()) else SEMANTIC + line for line in lines]
    return lines


def overlay(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The masks (N, H, W) bool blended over the image in the palette's colours: (H, W, 3) uint8."""
    out = image.astype(np.float32)
    for i, mask in enumerate(masks):
        colour = PALETTE[i % len(PALETTE)]
        out[mask] = (1 - ALPHA) * out[mask] + ALPHA * colour
    return out.round().clip(0, 255).astype(np.uint8)


def _file_name(i: int, text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "mask"
    return f"mask_{i:02d}_{slug}.png"


def segment(predict: Predict, image: np.ndarray | None, text: str, semantic: bool, out_root: Path):
    """What the Segment button does: (overlay image, mask PNG paths, summary markdown)."""
    from PIL import Image

    if image is None:
        raise ValueError("upload or pick an image first")
    texts = expressions(text, semantic)
    if not texts:
        raise ValueError("type at least one expression (one per line)")
    image = np.ascontiguousarray(image[..., :3].astype(np.uint8))
    masks = np.asarray(predict(image, texts)) > 0
    folder = Path(tempfile.mkdtemp(prefix="masks-", dir=out_root))
    files = []
    rows = ["| colour | expression | mask pixels |", "|---|---|---|"]
    for i, (t, m) in enumerate(zip(texts, masks, strict=True)):
        path = folder / _file_name(i, t)
        Image.fromarray(m.astype(np.uint8) * 255).save(path)
        files.append(str(path))
        r, g, b = PALETTE[i % len(PALETTE)].astype(int)
        shown = html.escape(t).replace("|", "&#124;")
        rows.append(f"| <span style='color:rgb({r},{g},{b})'>&#9632;</span> | {shown} | {int(m.sum())} |")
    return overlay(image, masks), files, "\n".join(rows)


def example_image(folder: Path) -> Path:
    """A small synthetic picture (coloured shapes) to pick when no image is at hand."""
    from PIL import Image, ImageDraw

    path = folder / "example_shapes.png"
    if not path.is_file():
        img = Image.new("RGB", (320, 240), (235, 235, 225))
        draw = ImageDraw.Draw(img)
        draw.ellipse((30, 60, 130, 160), fill=(210, 30, 30))
        draw.rectangle((180, 40, 290, 150), fill=(30, 60, 200))
        draw.polygon([(120, 220), (170, 140), (220, 220)], fill=(40, 170, 60))
        img.save(path)
    return path


def build_demo(predict: Predict, title: str = "EVF-SAM", work_dir: str | os.PathLike | None = None):
    """The Gradio Blocks app around `predict`."""
    gr = import_gradio()
    work = Path(work_dir or tempfile.mkdtemp(prefix="evfsam-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nText-prompted segmentation: one expression per line; tick `[semantic]` "
                    "for stuff / part classes (\"sky\", \"left shoe\").")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="numpy", label="Image", sources=["upload", "clipboard"], elem_id="image")
                text = gr.Textbox(lines=3, label="Expressions (one per line)", elem_id="expressions",
                                  placeholder="the man on the left\nthe red car")
                semantic = gr.Checkbox(label="[semantic]", value=False, elem_id="semantic")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
                gr.Examples([[str(example_image(work)), "the red circle\nthe blue square"]], inputs=[image, text],
                            label="Pick an example")
            with gr.Column():
                result = gr.Image(type="numpy", label="Masks overlaid", interactive=False, elem_id="overlay",
                                  format="png")
                legend = gr.Markdown(elem_id="legend")
                files = gr.File(label="Download masks (PNG)", file_count="multiple", elem_id="downloads")

        def run(img, txt, sem):
            try:
                return segment(predict, img, txt, sem, work)
            except ValueError as e:
                raise gr.Error(str(e)) from e

        button.click(run, inputs=[image, text, semantic], outputs=[result, files, legend])
    demo.evfsam_work_dir = work
    return demo


def offline_theme():
    """Gradio's default look with system fonts, so the page needs nothing from the internet."""
    gr = import_gradio()
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def predictor_for(checkpoint: str | os.PathLike) -> tuple[Predict, str]:
    """A predict function for any checkpoint `load_for_inference` accepts, or an ONNX export folder
    (`onnx_config.json`); returns it with a title."""
    path = Path(checkpoint)
    if (path / "onnx_config.json").is_file():
        from evfsam_lightning.deploy.onnx import OnnxPredictor

        onnx = OnnxPredictor(path)
        return (lambda image, texts: onnx.predict(image, texts)), f"EVF-SAM (ONNX: {path.name})"
    from evfsam_lightning.training.loading import load_for_inference

    model, tokenizer = load_for_inference(path)

    def predict(image: np.ndarray, texts: list[str]) -> np.ndarray:
        return model.predict(image, texts, tokenizer).float().cpu().numpy()

    return predict, f"EVF-SAM ({path.name})"
