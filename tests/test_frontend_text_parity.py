"""Text frontend: normalisation, splitting and token ids against the reference."""
import json

import pytest

from cosyvoice.frontend.text import TextNormalizer, remove_blanks, split_paragraph
from cosyvoice.frontend.tokenizer import QwenTokenizer


@pytest.fixture(scope="module")
def texts(fixture_dir):
    return json.loads((fixture_dir / "reference" / "frontend_text.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return QwenTokenizer(model_dir / "CosyVoice-BlankEN")


@pytest.fixture(scope="module")
def normalizer(tokenizer):
    return TextNormalizer(tokenizer.count)


@pytest.mark.parity
def test_special_token_ids(tokenizer, texts):
    assert len(tokenizer) == texts["len_tokenizer"]
    for token, token_id in texts["special_token_ids"].items():
        assert tokenizer.token_id(token) == token_id


@pytest.mark.parity
def test_normaliser_is_the_one_the_reference_used(normalizer, texts):
    assert normalizer.engine == texts["normaliser"]


@pytest.mark.parity
def test_samples_normalise_split_and_tokenise_like_the_reference(normalizer, tokenizer, texts):
    for name, sample in texts["samples"].items():
        segments = normalizer.split(sample["raw"])
        print(f"[parity] text {name}: {len(segments)} segments")
        assert segments == sample["segments"], name
        assert [tokenizer.encode(s) for s in segments] == sample["segment_ids"], name
        assert tokenizer.encode(sample["raw"]) == sample["ids_without_frontend"], name


@pytest.mark.parity
def test_prompt_text(normalizer, tokenizer, texts):
    normalized = normalizer.normalize(texts["prompt_text_raw"])
    assert normalized == texts["prompt_text_normalized"]
    assert tokenizer.encode(normalized) == texts["prompt_text_ids"]


@pytest.mark.parity
def test_segment_ids_match_frontend_arrays(normalizer, tokenizer, texts, reference):
    arrays = reference("frontend")
    for name, sample in texts["samples"].items():
        for i, segment in enumerate(normalizer.split(sample["raw"])):
            assert tokenizer.encode(segment) == arrays[f"text_{name}_seg{i}_ids"].tolist()


def test_instruct_marker_is_one_special_token(tokenizer):
    assert tokenizer.encode("<|endofprompt|>") == [tokenizer.token_id("<|endofprompt|>")]


@pytest.mark.parametrize("text", ["", "   ", "。！？", "……", "!!!", "!!! ... ???", "? ? ?", "—— $ %"])
def test_nothing_speakable_gives_no_segments(normalizer, text):
    assert normalizer.split(text) == []


def test_markup_passes_through_untouched(normalizer):
    text = "<|zh|>今天  2 点"
    assert normalizer.split(text) == [text]
    assert normalizer.normalize(text) == text


def test_chinese_cleanup_rules(normalizer):
    assert normalizer.normalize("面积是m²（大约）——很好，") == "面积是m平方大约 很好。"


def test_remove_blanks_keeps_spaces_between_ascii_words():
    assert remove_blanks("我有 PDF file 和 文件 ") == "我有PDF file和文件"


def test_split_paragraph_merges_short_pieces_and_tails():
    pieces = "一二三四五。" * 30
    segments = split_paragraph(pieces, len, "zh", max_len=20, min_len=10, merge_len=5)
    assert "".join(segments) == pieces
    assert all(10 < len(s) <= 20 for s in segments)
    assert split_paragraph("长的句子在这里。短。", len, "zh", merge_len=5) == ["长的句子在这里。短。"]
    assert split_paragraph('He said "hi." Then left', len, "en", max_len=10, min_len=5, merge_len=1) == ['He said "hi."', " Then left."]


def test_text_wetext_cannot_parse_is_spoken_as_written(normalizer):
    assert normalizer.split("I have ²3 cats") == ["I have ²three cats."]
