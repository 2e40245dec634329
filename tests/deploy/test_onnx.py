"""ONNX export (`evfsam-export --format onnx`) and the onnxruntime predictor against the torch model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="ONNX extra not installed: pip install -e '.[onnx]'")
pytest.importorskip("onnxscript", reason="ONNX extra not installed: pip install -e '.[onnx]'")

from evfsam_lightning.cli import export as export_cli  # noqa: E402
from evfsam_lightning.config import ConfigError  # noqa: E402
from evfsam_lightning.deploy.onnx import CONFIG, IMAGE_ENCODER, TEXT_DECODER, OnnxPredictor  # noqa: E402
from evfsam_lightning.models.checkpoints import export_reference  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny EVF-SAM exported in the official layout, then to ONNX by the console script's main."""
    from evfsam_lightning.models.builders import build_model

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    with torch.no_grad():  # non-trivial image features (the tiny model's init makes them near zero)
        for p in model.visual_model.vision_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    root = tmp_path_factory.mktemp("onnx")
    folder = export_reference(model, root / "official", tokenizer_dir=tiny_tokenizer_dir)
    out = root / "onnx"
    assert export_cli.main(["--checkpoint", str(folder), "--format", "onnx", "--out", str(out)]) == 0
    return model, out


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[h // 4 : h // 2, w // 3 : 2 * w // 3] = (220, 30, 30)
    return image


@pytest.mark.slow
def test_export_writes_two_graphs_with_dynamic_text_axes(onnx_export):
    import onnx

    _, out = onnx_export
    config = json.loads((out / CONFIG).read_text())
    assert config["family"] == "sam" and config["image_feature_names"] == ["image_embeddings"]
    assert (out / "sentencepiece.bpe.model").is_file()
    graph = onnx.load(str(out / TEXT_DECODER)).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert isinstance(dims["input_ids"][0], str) and isinstance(dims["input_ids"][1], str), dims
    assert dims["attention_mask"][:2] == dims["input_ids"][:2]
    enc = onnx.load(str(out / IMAGE_ENCODER)).graph
    assert isinstance(enc.input[0].type.tensor_type.shape.dim[0].dim_param, str)


@pytest.mark.slow
@pytest.mark.parametrize("texts", [
    "the red square",
    ["the red square", "a shape", "[semantic] the very small green object on the far left side"],
])
def test_onnxruntime_predict_matches_torch(onnx_export, tiny_tokenizer_dir, texts):
    from evfsam_lightning.data.tokenizer import load_tokenizer

    model, out = onnx_export
    predictor = OnnxPredictor(out)
    image = _image(45, 70)
    ours = predictor.predict(image, texts)
    golden = model.predict(image, texts, load_tokenizer(tiny_tokenizer_dir)).numpy()
    assert ours.shape == golden.shape == ((45, 70) if isinstance(texts, str) else (3, 45, 70))
    assert np.abs(ours - golden).max() <= TOL
    assert ((ours > 0) == (golden > 0)).all()
    if not isinstance(texts, str):  # the expressions really differ in length (padding inside the graph)
        ids = predictor.tokenizer(texts)["input_ids"]
        assert len({len(i) for i in ids}) == 3, ids


@pytest.mark.slow
def test_demo_segments_with_an_onnx_export(onnx_export, tmp_path):
    pytest.importorskip("gradio", reason="demo extra not installed")
    from evfsam_lightning.deploy.demo import predictor_for, segment

    _, out = onnx_export
    predict, title = predictor_for(out)
    image = _image(40, 60)
    overlaid, files, legend = segment(predict, image, "the red square\nsky", True, tmp_path)
    assert "ONNX" in title and overlaid.shape == image.shape and len(files) == 2
    assert "[semantic] sky" in legend


def test_export_onnx_rejects_a_dtype(tmp_path, capsys):
    code = export_cli.main(["--checkpoint", str(tmp_path), "--format", "onnx", "--dtype", "bf16",
                            "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "ONNX graphs are exported in float32" in err and len(err.strip().splitlines()) == 1


def test_predictor_on_a_folder_without_graphs_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="onnx_config.json"):
        OnnxPredictor(tmp_path)


@pytest.mark.slow
def test_check_parity_onnx_on_fixture_a():
    import subprocess
    import sys

    from tests.conftest import REPO, fixture_dir

    fixture = fixture_dir("evfsam_parity_a")
    result = subprocess.run([sys.executable, str(REPO / "tools" / "check_parity.py"), str(fixture), "--onnx"],
                            capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    for name in ("onnx.image_embeddings", "onnx.low_res_masks", "onnx.iou_predictions", "onnx.mask_logits",
                 "onnx.pred_mask", "onnx.train_low_res_masks"):
        assert any(line.startswith(name + " ") and line.rstrip().endswith("pass")
                   for line in result.stdout.splitlines()), (name, result.stdout)
