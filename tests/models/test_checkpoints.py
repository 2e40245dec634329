"""Checkpoint I/O: every format, key reports that name the key, lossless export round trip."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from evfsam_lightning.models import checkpoints as ck
from evfsam_lightning.models.builders import build_model


def _randomise(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.state_dict().values():
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
    return model


def _reference_state(model):
    return ck.to_reference(model, model.state_dict())


def test_export_then_load_is_lossless(tmp_path, tiny_tokenizer_dir):
    model = _randomise(build_model("tiny"))
    out = ck.export_reference(model, tmp_path / "export", tokenizer_dir=tiny_tokenizer_dir)
    assert (out / "model.safetensors").is_file() and (out / "sentencepiece.bpe.model").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["EvfSamModel"] and config["out_dim"] == 64
    loaded, tokenizer = ck.load_reference_folder(out)
    assert tokenizer("a")["input_ids"][0] == 0
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    # exported names are the official ones
    names = set(ck.read_state_dict(out / "model.safetensors"))
    assert "visual_model.image_encoder.blocks.0.attn.qkv.weight" in names
    assert "visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in names
    assert "visual_model.mask_decoder.iou_prediction_head.layers.2.weight" in names


def test_folder_with_pytorch_model_bin_loads(tmp_path, tiny_tokenizer_dir):
    model = _randomise(build_model("tiny"))
    out = ck.export_reference(model, tmp_path / "export", tokenizer_dir=tiny_tokenizer_dir)
    state = ck.read_state_dict(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, out / "pytorch_model.bin")
    loaded, _ = ck.load_reference_folder(out)
    key = "mm_extractor.beit3.text_embed.weight"
    assert loaded.state_dict()[key].dtype == torch.float32  # cast per tensor on load
    assert torch.equal(loaded.state_dict()[key], state[key].to(torch.bfloat16).float())


def test_missing_tokenizer_is_named(tmp_path):
    model = build_model("tiny")
    out = ck.export_reference(model, tmp_path / "export")
    with pytest.raises(ck.CheckpointError, match="missing sentencepiece.bpe.model"):
        ck.load_reference_folder(out)


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_bad_keys_fail_naming_the_key(tmp_path, case):
    model = build_model("tiny")
    state = _reference_state(model)
    key = "visual_model.mask_decoder.iou_token.weight"
    if case == "missing":
        del state[key]
    elif case == "extra":
        key = "visual_model.mask_decoder.surplus.weight"
        state[key] = torch.zeros(3)
    else:
        state[key] = torch.zeros(2, 5)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_reference_weights(build_model("tiny"), path)
    assert case if case != "shape" else "wrongly shaped" in str(err.value)
    assert (key if case != "missing" else "mask_decoder.iou_token.weight") in str(err.value)
    assert str(path) in str(err.value)


def test_nothing_is_copied_when_keys_do_not_fit(tmp_path):
    model = build_model("tiny")
    state = _reference_state(_randomise(build_model("tiny")))
    state.pop("text_hidden_fcs.0.0.bias")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ck.CheckpointError):
        ck.load_into(model, ck.from_reference(model, state))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_corrupted_file_is_named(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x80\x02this is not a checkpoint" * 10)
    with pytest.raises(ck.CheckpointError, match="broken"):
        ck.read_state_dict(path)


def test_pickle_with_code_is_refused(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(ck.CheckpointError, match="evil.pth"):
        ck.read_state_dict(path)


def test_sam_pth_loads_into_the_sam_part_only(tmp_path):
    source = _randomise(build_model("tiny"))
    sam_state = {k[len("visual_model."):]: v for k, v in _reference_state(source).items()
                 if k.startswith("visual_model.")}
    torch.save(sam_state, tmp_path / "sam_vit_t.pth")
    model = build_model("tiny")
    beit_before = model.mm_extractor.state_dict()["beit3.text_embed.weight"].clone()
    report = ck.load_sam_checkpoint(model, tmp_path / "sam_vit_t.pth")
    assert report.loaded == len(sam_state)
    assert torch.equal(model.visual_model.state_dict()["mask_decoder.iou_token.weight"],
                       source.visual_model.state_dict()["mask_decoder.iou_token.weight"])
    assert torch.equal(model.mm_extractor.state_dict()["beit3.text_embed.weight"], beit_before)


def test_beit3_pth_loads_and_rejects_unknown_heads(tmp_path):
    source = _randomise(build_model("tiny"))
    state = {k[len("mm_extractor."):]: v for k, v in source.state_dict().items() if k.startswith("mm_extractor.")}
    torch.save({"model": state}, tmp_path / "beit3.pth")
    model = build_model("tiny")
    ck.load_beit3_checkpoint(model, tmp_path / "beit3.pth")
    assert torch.equal(model.beit3.encoder.layers[0].ffn.B.fc1.weight, source.beit3.encoder.layers[0].ffn.B.fc1.weight)
    state["mlm_head.weight"] = torch.zeros(4, 4)
    torch.save({"model": state}, tmp_path / "beit3_head.pth")
    with pytest.raises(ck.CheckpointError, match="mlm_head.weight"):
        ck.load_beit3_checkpoint(build_model("tiny"), tmp_path / "beit3_head.pth")
    ck.load_beit3_checkpoint(build_model("tiny"), tmp_path / "beit3_head.pth", allow_unexpected=["mlm_head."])


def test_hf_sam_layout_loads(tmp_path):
    source = _randomise(build_model("tiny"))
    state = {k[len("visual_model."):]: v for k, v in source.state_dict().items() if k.startswith("visual_model.")}
    state["shared_image_embedding.positional_embedding"] = state["prompt_encoder.shared_embedding.positional_embedding"].clone()
    (tmp_path / "hf").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "hf" / "model.safetensors"))
    model = build_model("tiny")
    ck.load_hf_sam_checkpoint(model, tmp_path / "hf")
    assert torch.equal(model.visual_model.vision_encoder.pos_embed, source.visual_model.vision_encoder.pos_embed)


def test_gaussian_matrix_never_trains():
    model = build_model("tiny")
    assert not model.visual_model.prompt_encoder.shared_embedding.positional_embedding.requires_grad


def test_export_opens_with_auto_tokenizer_and_follows_the_umask(tmp_path, tiny_tokenizer_dir):
    """The official inference code opens the folder with AutoTokenizer(use_fast=False): it needs
    tokenizer_config.json; and the folder is group/world readable under a 022 umask."""
    from transformers import AutoTokenizer

    from evfsam_lightning.data.tokenizer import load_tokenizer

    old = os.umask(0o022)
    try:
        out = ck.export_reference(build_model("tiny"), tmp_path / "exported", tokenizer_dir=tiny_tokenizer_dir)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in out.iterdir()), \
        {f.name: oct(f.stat().st_mode) for f in out.iterdir()}
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "XLMRobertaTokenizer"
    auto = AutoTokenizer.from_pretrained(str(out), use_fast=False)
    ours = load_tokenizer(out)
    texts = ["the red circle", "[semantic] left shoe", "an unseen zebra!"]
    assert auto(texts)["input_ids"] == ours(texts)["input_ids"]
    assert auto.convert_tokens_to_ids("[semantic]") == json.loads((out / "added_tokens.json").read_text())["[semantic]"]
    assert ours("[semantic] wall")["input_ids"][1] == auto.convert_tokens_to_ids("[semantic]")


def test_folder_loaded_on_meta_takes_the_files_values_cast_to_fp32(tmp_path, tiny_tokenizer_dir):
    """load_reference_folder assigns the file's tensors (no initialised model beside them): every
    weight is a real tensor with the file's values, and a bf16 export is cast to the model's fp32."""
    torch.manual_seed(0)
    model = _randomise(build_model("tiny"))
    out = ck.export_reference(model, tmp_path / "bf16", tokenizer_dir=tiny_tokenizer_dir, dtype=torch.bfloat16)
    loaded, _ = ck.load_reference_folder(out)
    for name, tensor in loaded.state_dict().items():
        assert not tensor.is_meta and tensor.dtype == model.state_dict()[name].dtype, name
        torch.testing.assert_close(tensor, model.state_dict()[name].to(torch.bfloat16).to(tensor.dtype))


@pytest.mark.parametrize("size", ["tiny", "tiny-sam2"])
def test_parts_filled_by_checkpoints_are_built_without_memory_and_take_the_files_values(tmp_path, size):
    """build_configured_model leaves the parts `sam_checkpoint` / `beit3_checkpoint` fill on the meta
    device and gives them the files' tensors: the same model as initialising them and copying over,
    trainable as before, nothing left on meta; the projector comes from the seeded random stream."""
    from evfsam_lightning.config import load
    from evfsam_lightning.models.from_config import build_configured_model

    source = _randomise(build_model(size))
    reference = _reference_state(source)
    sam = {k[len("visual_model."):]: v for k, v in reference.items() if k.startswith("visual_model.")}
    torch.save({"model": sam} if size == "tiny-sam2" else sam, tmp_path / "sam.pth")
    beit3 = {k[len("mm_extractor."):]: v for k, v in source.state_dict().items() if k.startswith("mm_extractor.")}
    torch.save({"model": beit3}, tmp_path / "beit3.pth")
    cfg = load(None, ["data.synthetic.dir=unused", f"model.size={size}", f"model.sam_checkpoint={tmp_path / 'sam.pth'}",
                      f"model.beit3_checkpoint={tmp_path / 'beit3.pth'}"])
    torch.manual_seed(0)
    model = build_configured_model(cfg)
    torch.manual_seed(0)
    again = build_configured_model(cfg)
    copied = build_model(size)  # the old way: initialise everything, then copy the files in
    ck.load_sam_checkpoint(copied, tmp_path / "sam.pth")
    ck.load_beit3_checkpoint(copied, tmp_path / "beit3.pth")
    state, expected = model.state_dict(), copied.state_dict()
    assert not [k for k, v in state.items() if v.is_meta]
    for k, v in state.items():
        if k.startswith("text_hidden_fcs."):
            assert torch.equal(v, again.state_dict()[k]) and torch.isfinite(v).all(), k
        else:
            assert torch.equal(v, expected[k]) and v.dtype == expected[k].dtype, k
    grads = {n: p.requires_grad for n, p in copied.named_parameters()}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(p.is_contiguous() for p in model.parameters())
