"""The XLM-R sentencepiece tokenizer that BEiT-3 reads (`<s>`=0, `<pad>`=1, `</s>`=2, right padding).

Loaded from a local folder holding `sentencepiece.bpe.model` (as shipped with EVF-SAM checkpoints),
plus `added_tokens.json` when the checkpoint adds tokens such as `[semantic]` (id 64002).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

SPM_FILE = "sentencepiece.bpe.model"
PAD_ID = 1
SEMANTIC_TOKEN = "[semantic]"


def load_tokenizer(path: str | Path):
    """Load the XLM-R tokenizer from a folder (or the `sentencepiece.bpe.model` file itself).

    `XLMRobertaTokenizer(vocab_file=...)` silently ignores the file in transformers 5 (every token
    becomes `<unk>`), so we always go through `from_pretrained(folder)` and check the result."""
    from transformers import XLMRobertaTokenizer

    path = Path(path)
    folder = path.parent if path.is_file() else path
    spm = folder / SPM_FILE
    if not spm.is_file():
        raise FileNotFoundError(f"tokenizer: {spm} not found (EVF-SAM checkpoints ship it next to config.json)")
    tok = XLMRobertaTokenizer.from_pretrained(str(folder), padding_side="right")
    added = folder / "added_tokens.json"
    if added.is_file():
        for token, expected in json.loads(added.read_text()).items():
            got = tok.convert_tokens_to_ids(token)
            if got != expected:
                raise ValueError(f"tokenizer: {added} maps {token!r} to {expected}, the loaded tokenizer to {got}")
    probe = tok("a")["input_ids"]
    if probe[0] != 0 or probe[-1] != 2 or tok.pad_token_id != PAD_ID:
        raise ValueError(f"tokenizer at {folder} does not have XLM-R's layout (<s>=0, <pad>=1, </s>=2): {probe}")
    return tok


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, L) right-padded with 1 and truncated to `max_length` (keeping `</s>`), and the
    attention mask `ids != pad` as bool."""
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    ids = enc["input_ids"].long()
    return ids, ids != PAD_ID


def build_tokenizer(sentences: Iterable[str], out_dir: str | Path, vocab_size: int = 256,
                    added_tokens: Sequence[str] = ()) -> Path:
    """Train a small sentencepiece model with XLM-R's layout on `sentences` and save it as a tokenizer
    folder. For tests and the synthetic quickstart (no download needed); takes well under a second."""
    import io

    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        character_coverage=1.0, minloglevel=2,
    )
    (out_dir / SPM_FILE).write_bytes(model.getvalue())
    tok = load_tokenizer(out_dir)
    if added_tokens:
        tok.add_tokens(list(added_tokens), special_tokens=True)
        ids = {t: tok.convert_tokens_to_ids(t) for t in added_tokens}
        (out_dir / "added_tokens.json").write_text(json.dumps(ids))
    return out_dir
