"""The tiny preset's tokenizers: byte-level, and BPE learned on captions (what the testbed's
recipe uses), including the fit_vae stage that swaps one for the other."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from train.models import byte_level_tokenizer, caption_bpe_tokenizer, learn_bpe_merges  # noqa: E402
from train.monitor.tokens import end_token_index  # noqa: E402

CAPTIONS = [
    "a red apple emoji, flat vector art",
    "a green apple emoji, simple bold",
    "an icon of a red heart, flat vector art",
    "a drawing of a yellow star, simple",
    "a red apple emoji with passport control sticker, bold",
] * 3


def test_learn_bpe_merges_by_hand():
    words = Counter({("a", "b", "c</w>"): 3, ("a", "b</w>"): 2, ("x", "y</w>"): 1})
    # "a b" and "b c</w>" both occur 3 times: the tie goes to the smaller pair, "a b"; then
    # "ab c</w>" (3), "a b</w>" (2), "x y</w>" (1). Ties are broken by the pair itself, never by
    # the order the words came in.
    assert learn_bpe_merges(words, 2) == [("a", "b"), ("ab", "c</w>")]
    assert learn_bpe_merges(words, 10) == [("a", "b"), ("ab", "c</w>"), ("a", "b</w>"), ("x", "y</w>")]
    reordered = Counter(dict(reversed(list(words.items()))))
    assert learn_bpe_merges(reordered, 10) == learn_bpe_merges(words, 10)
    tie = Counter({("q", "r</w>"): 1, ("c", "d</w>"): 1})
    assert learn_bpe_merges(tie, 1) == [("c", "d</w>")]


def test_caption_bpe_tokenizer_makes_frequent_words_single_tokens():
    tok = caption_bpe_tokenizer(CAPTIONS, 200)
    assert tok.tokenize("a red apple emoji") == ["a</w>", "red</w>", "apple</w>", "emoji</w>"]
    assert len(tok) < len(byte_level_tokenizer()) + 200 + 1  # bytes + at most one token per merge
    # 4x fewer tokens than one per character on a caption it learned from
    caption = CAPTIONS[4]
    assert len(tok(caption).input_ids) * 3 < len(byte_level_tokenizer()(caption).input_ids)
    # nothing is unknown: an unseen word (and non-ASCII) splits into pieces and decodes back
    ids = tok("Zebra crossing ü").input_ids
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True).strip() == "zebra crossing ü"
    # SD1.x conventions the monitor relies on: BOS first, EOS right after the prompt
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == tok.pad_token_id
    assert end_token_index(tok, [caption]).tolist() == [len(tok(caption).input_ids) - 1]


def test_caption_bpe_tokenizer_is_deterministic_and_round_trips(tmp_path):
    a = caption_bpe_tokenizer(CAPTIONS, 100)
    b = caption_bpe_tokenizer(list(reversed(CAPTIONS)), 100)
    assert a.get_vocab() == b.get_vocab()
    a.save_pretrained(tmp_path / "tok")
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    for caption in CAPTIONS[:5] + ["an unseen caption, 42 words"]:
        assert loaded(caption).input_ids == a(caption).input_ids


def test_caption_bpe_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="merges"):
        caption_bpe_tokenizer(CAPTIONS, 0)
    with pytest.raises(ValueError, match="at least one caption"):
        caption_bpe_tokenizer([], 10)


def test_fit_vae_with_bpe_writes_a_loadable_pipeline(tmp_path, monkeypatch, capsys):
    """Stage 1 of the testbed recipe with --bpe-merges: the pipeline it writes loads through the
    ordinary from_pretrained path, with a tokenizer learned on the training captions and a text
    encoder sized for it."""
    from omegaconf import OmegaConf

    from data.testbed import build_testbed
    from launch.testbed import fit_vae
    from launch.testbed.reading import read_rows
    from train.models import load_components

    out = tmp_path / "tiny-ae"
    data = build_testbed(tmp_path / "data", resolution=16, n_clean=24, n_heldout=8, n_global=3, global_repeats=4,
                         n_local_groups=2, local_per_group=4)
    overrides = [f"model.cache_dir={tmp_path / 'cache'}", "data.resolution=16", f"data.path={data}"]
    repo = Path(__file__).resolve().parents[1]
    # a bad merge count fails before the minutes of VAE fitting, naming the flag (the rest of the
    # command line is valid, so only the check on the count can stop it)
    monkeypatch.setattr(sys, "argv", ["fit_vae", "--config", str(repo / "configs/testbed/common.yaml"),
                                      "--out", str(out), "--steps", "2", "--bpe-merges", "-1", *overrides])
    with pytest.raises(SystemExit) as exit_info:
        fit_vae.main()
    assert exit_info.value.code == 2 and "--bpe-merges must be >= 0 (got -1" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setattr(sys, "argv", ["fit_vae", "--config", str(repo / "configs/testbed/common.yaml"),
                                      "--out", str(out), "--steps", "2", "--bpe-merges", "300", *overrides])
    fit_vae.main()
    info = json.loads((out / "copyguard_vae.json").read_text())
    assert info["bpe_merges"] == 300 and info["steps"] == 2
    model_cfg = OmegaConf.create({"preset": None, "pretrained": str(out), "revision": None, "variant": None,
                                  "prediction_type": None, "init_from": None})
    parts = load_components(model_cfg, 16)
    assert parts.text_encoder.config.vocab_size == len(parts.tokenizer) > len(byte_level_tokenizer())
    testbed = Path(info["trained_on"].split(" of ")[-1])
    train_texts = [t for r in read_rows(testbed, split="train") for t in [r["text"], *r["captions"]]]
    assert parts.tokenizer.get_vocab() == caption_bpe_tokenizer(train_texts, 300).get_vocab()
    caption = read_rows(testbed, split="train", group="global")[0]["text"]
    assert len(parts.tokenizer(caption).input_ids) * 2 < len(byte_level_tokenizer()(caption).input_ids)
