"""The text tokenizer: a local Hugging Face tokenizer (Qwen2.5 for real runs) or the committed debug tokenizer.

Sequence plans need a handful of Qwen chat/vision special tokens (`SPECIAL_TOKENS`). A tokenizer that lacks some
gets them appended as special added tokens, so len(tokenizer), the number of CE classes, can grow; the model's
embedding table must have at least that many rows.

The debug tokenizer (`lance_ds/assets/debug_tokenizer/`, rebuilt by `tools/build_debug_tokenizer.py`) is a 2048-token
byte-level BPE with Qwen2's pre-tokenizer, trained on plain English and the example world's captions; its 22 Qwen
special tokens take the last ids (2026..2047) in Qwen's order, as Qwen2.5's take 151643..151664.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEBUG_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "debug_tokenizer"

# Qwen2.5's added tokens in id order (151643..151664); the debug tokenizer appends them in the same order.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)

# The ones sequence plans use; load_tokenizer adds any that a tokenizer lacks.
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|endoftext|>")


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the special tokens in sequence plans (Qwen2.5: 151644, 151645, 151652, 151653, 151656, 151643)."""

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    video_pad: int  # placeholder id in every vision slot (the model replaces its embedding)
    uncond: int  # <|endoftext|>: replaces a dropped caption (classifier-free guidance); also fills padding

    @property
    def pad(self) -> int:
        return self.uncond


class TextTokenizer:
    """A Hugging Face tokenizer with the ids sequence plans need.

    encode(text) -> token ids without any added BOS/EOS, and without special tokens: text that spells one
    ("<|im_end|>" in a scraped caption) is tokenized as the characters it is, so data cannot inject the chat
    template's control tokens (or <|endoftext|>, the padding id). len(tokenizer) is the number of CE classes (CE
    logits are sliced to it).
    """

    def __init__(self, hf_tokenizer, source: str):
        self.hf = hf_tokenizer
        self.source = source  # where it was loaded from, for messages
        ids = {t: hf_tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        self.special = SpecialTokenIds(
            im_start=ids["<|im_start|>"], im_end=ids["<|im_end|>"], vision_start=ids["<|vision_start|>"],
            vision_end=ids["<|vision_end|>"], video_pad=ids["<|video_pad|>"], uncond=ids["<|endoftext|>"])

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.hf.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"TextTokenizer({self.source}, num_classes={len(self)}, special={self.special})"


def load_tokenizer(path: str | Path | None = None) -> TextTokenizer:
    """A local tokenizer directory (e.g. Qwen2.5's), or the debug tokenizer when `path` is None.

    Never downloads: `path` must be a directory holding tokenizer.json (or the slow tokenizer's files).
    Missing SPECIAL_TOKENS are appended as special tokens (after the existing ids).
    """
    from transformers import AddedToken, AutoTokenizer

    directory = Path(path) if path is not None else DEBUG_TOKENIZER_DIR
    if not directory.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory not found: {directory}; set model.tokenizer_path to a local Hugging Face tokenizer "
            "directory (e.g. a Qwen2.5 checkpoint's), or leave it null for the debug tokenizer")
    try:
        hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load a tokenizer from {directory}: {e}; the directory needs tokenizer.json "
                         "and tokenizer_config.json (as saved by save_pretrained)") from None
    vocab = hf.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return TextTokenizer(hf, str(directory if path is not None else "debug tokenizer"))
