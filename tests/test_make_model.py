"""`make-model`: a random-weight model directory that every part of the runtime can load and run."""
import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyvoice.frontend.speech_models import PromptFeatureExtractor
from cosyvoice.frontend.tokenizer import SPECIAL_TOKENS, QwenTokenizer
from cosyvoice.loading.model_dir import QWEN_DIR, REQUIRED_FILES, YAML_NAME, check_model_dir, load_model, read_config
from cosyvoice.tools.make_model import SIZES, add_make_model_command, make_model, run, write_yaml

STAGE_KEYS = ("llm", "flow", "hift", "get_tokenizer", "allowed_special", "feat_extractor", "sample_rate",
              "token_frame_rate", "token_mel_ratio", "chunk_size", "spk_embed_dim")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("make_model") / "tiny", size="tiny", seed=0)


def test_directory_has_the_official_layout(tiny_dir):
    check_model_dir(tiny_dir)
    for name in REQUIRED_FILES + ("configuration.json", f"{QWEN_DIR}/generation_config.json"):
        assert (tiny_dir / name).is_file(), name
    assert not (tiny_dir / QWEN_DIR / "tokenizer.json").exists()


def test_checkpoints_keep_the_official_key_layout(tiny_dir):
    llm = torch.load(tiny_dir / "llm.pt", weights_only=True)
    assert torch.equal(llm["llm.model.lm_head.weight"], llm["llm.model.model.embed_tokens.weight"])
    hift = torch.load(tiny_dir / "hift.pt", weights_only=True)
    assert "conv_pre.parametrizations.weight.original0" in hift
    assert "conv_pre.parametrizations.weight.original1" in hift


def test_model_loads_and_synthesises_finite_audio(tiny_dir):
    stages = load_model(tiny_dir)
    text_ids = torch.tensor([QwenTokenizer(tiny_dir / QWEN_DIR).encode("Hello, 你好 123.")], dtype=torch.int32)
    empty = torch.zeros(1, 0, dtype=torch.int32)
    generator = torch.Generator().manual_seed(0)
    tokens = list(itertools.islice(stages.llm.generate(text_ids, empty, empty, generator=generator), 10))
    assert len(tokens) == 10 and all(0 <= t < 6561 for t in tokens)

    mel = stages.flow.inference(torch.tensor([tokens]), empty, torch.zeros(1, 0, 80), torch.randn(1, 192),
                                streaming=False, finalize=True)
    speech, _ = stages.hift.inference(mel, generator=generator)
    assert mel.shape == (1, 80, 20)
    assert speech.shape == (1, 20 * 480)
    assert torch.isfinite(speech).all() and speech.abs().max() <= 0.99 and speech.std() > 0


def test_tokenizer_encodes_chinese_english_and_digits(tiny_dir):
    tokenizer = QwenTokenizer(tiny_dir / QWEN_DIR)
    vocab_size = json.loads((tiny_dir / QWEN_DIR / "config.json").read_text())["vocab_size"]
    end_of_text = tokenizer.token_id("<|endoftext|>")
    assert [tokenizer.token_id(t) for t in SPECIAL_TOKENS] == list(range(end_of_text + 1, len(tokenizer)))
    assert len(tokenizer) <= vocab_size
    for text in ("今天天气很好。", "Hello world!", "0123456789"):
        ids = tokenizer.encode(text)
        assert ids and max(ids) < end_of_text
    assert len(tokenizer.encode("0123456789")) == 10   # Qwen splits numbers into single digits


def test_frontend_runs_the_toy_onnx_models(tiny_dir):
    mel_params = read_config(tiny_dir / YAML_NAME).resolve("feat_extractor").kwargs
    extractor = PromptFeatureExtractor(tiny_dir, mel_params, token_mel_ratio=2)
    noise = np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 0.1
    features = extractor.extract(noise, 16000)
    assert features.speech_tokens.shape == (1, 50)
    assert features.embedding.shape == (1, 192)
    assert features.speech_feat.shape == (1, 100, 80)
    tokens = features.speech_tokens
    assert tokens.min() >= 0 and tokens.max() < 6561 and len(np.unique(tokens)) > 10
    assert not np.array_equal(extractor.speech_tokens(noise * 0.5 + np.roll(noise, 7)), tokens)


def test_same_seed_writes_identical_files(tiny_dir, tmp_path):
    parser = argparse.ArgumentParser()
    add_make_model_command(parser.add_subparsers())
    assert run(parser.parse_args(["make-model", "--size", "tiny", "--out", str(tmp_path / "again")])) == 0
    for path in tiny_dir.rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (tmp_path / "again" / path.relative_to(tiny_dir)).read_bytes(), path
    other = make_model(tmp_path / "other", seed=1)
    assert (other / "llm.pt").read_bytes() != (tiny_dir / "llm.pt").read_bytes()


def test_refuses_a_directory_that_is_not_empty(tiny_dir):
    with pytest.raises(FileExistsError):
        make_model(tiny_dir)


def test_full_size_yaml_matches_the_official_model_sections(fixture_dir, tmp_path):
    write_yaml(tmp_path / YAML_NAME, SIZES["full"])
    ours = read_config(tmp_path / YAML_NAME)
    official = read_config(fixture_dir.parent / "configs" / "cosyvoice2.yaml")
    for key in STAGE_KEYS:
        assert ours.resolve(key) == official.resolve(key), key
