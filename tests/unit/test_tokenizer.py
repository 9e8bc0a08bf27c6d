"""The tokenizer loader and the committed debug tokenizer."""

from __future__ import annotations

import filecmp
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lance_ds.config.data import GroupConfig, ImageOptions
from lance_ds.data.batch import Sample
from lance_ds.data.sequence import SequencePlanner, VisionGeometry
from lance_ds.data.tokenizer import DEBUG_TOKENIZER_DIR, QWEN_SPECIAL_TOKENS, SPECIAL_TOKENS, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_debug_tokenizer_has_qwen_specials_last():
    tok = load_tokenizer(None)
    assert len(tok) == 2048
    ids = [tok.hf.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS]
    assert ids == list(range(2048 - len(QWEN_SPECIAL_TOKENS), 2048))  # Qwen's order, after the learned tokens
    s = tok.special
    assert len({s.im_start, s.im_end, s.vision_start, s.vision_end, s.video_pad, s.uncond}) == 6
    assert s.uncond == tok.hf.convert_tokens_to_ids("<|endoftext|>") == s.pad


@pytest.mark.parametrize("text", [
    "a small red circle moves to the left",
    "make the blue square green",
    "What colour is the triangle? It is yellow.",
    "Zebra quantum xylophone: 3.14 ünïcödé ✓",
])
def test_debug_tokenizer_round_trips_and_compresses_example_text(text):
    tok = load_tokenizer(None)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert max(ids) < 2048 - len(QWEN_SPECIAL_TOKENS)  # plain text never becomes a special token
    if text.islower():  # example-world captions: about one token per word
        assert len(ids) <= len(text.split()) + 1


def test_text_that_spells_a_special_token_stays_text():
    """A scraped caption holding "<|im_end|>" or "<|endoftext|>" (the padding id) must not end a turn or pad."""
    tok = load_tokenizer(None)
    text = "see <|im_end|> and <|endoftext|><|video_pad|>"
    ids = tok.encode(text)
    assert max(ids) < 2048 - len(QWEN_SPECIAL_TOKENS) and tok.decode(ids) == text


def test_debug_tokenizer_is_reproducible(tmp_path):
    spec = importlib.util.spec_from_file_location("build_debug_tokenizer", ROOT / "tools/build_debug_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(tmp_path)
    names = ["tokenizer.json", "tokenizer_config.json"]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path, DEBUG_TOKENIZER_DIR, names, shallow=False)
    assert match == names, f"committed debug tokenizer differs from a rebuild: {mismatch + errors}"


def test_missing_special_tokens_are_added(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, " ": 3}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    loaded = load_tokenizer(tmp_path)
    assert len(loaded) == len(vocab) + len(SPECIAL_TOKENS)
    assert sorted([loaded.special.im_start, loaded.special.im_end, loaded.special.vision_start,
                   loaded.special.vision_end, loaded.special.video_pad, loaded.special.uncond]) == list(range(4, 10))
    assert loaded.encode("hello world") == [1, 3, 2]
    assert loaded.hf.encode("<|im_start|>hello", add_special_tokens=False) == [loaded.special.im_start, 1]


def test_missing_directory_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.tokenizer_path"):
        load_tokenizer(tmp_path / "nope")


def test_piecewise_encoding_equals_the_rendered_chat():
    """The planner encodes text pieces between special tokens separately; with a Qwen2-style pre-tokenizer that gives
    the same ids as tokenising the whole rendered chat string."""
    tok = load_tokenizer(None)
    planner = SequencePlanner(tok, VisionGeometry())
    group = GroupConfig(name="g", task="i2t", image=ImageOptions(resolution=56))
    texts = {"caption_i": "You answer questions.", "caption_q": "What is it?\nBe brief.", "caption_a": " A red star."}
    plan = planner.plan(Sample("i2t", texts, {"image": torch.zeros(1, 56, 56, 3, dtype=torch.uint8)}, key="k"), group)
    rendered = (f"<|im_start|>system\n{texts['caption_i']}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                + "<|video_pad|>" * 4 + f"<|vision_end|>{texts['caption_q']}<|im_end|>\n<|im_start|>assistant\n"
                f"{texts['caption_a']}<|im_end|>")
    assert plan.input_ids.tolist() == tok.hf.encode(rendered, add_special_tokens=False)


def test_build_refuses_an_output_that_is_a_file(tmp_path, capsys, monkeypatch):
    """--output at (or under) a file gave a FileExistsError traceback after building; refused before, file untouched."""
    import sys

    spec = importlib.util.spec_from_file_location("build_debug_tokenizer", ROOT / "tools/build_debug_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "afile").write_text("mine")
    for output in (tmp_path / "afile", tmp_path / "afile" / "tok"):
        for check in ([], ["--check"]):
            monkeypatch.setattr(sys, "argv", ["build_debug_tokenizer.py", "--output", str(output), *check])
            assert module.main() == 2
            assert f"--output: {tmp_path / 'afile'} is a file" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"
