"""`make-model`: a random-weight model directory that every part of the runtime can load and run.

Most tests run once per generation (CosyVoice2 and CosyVoice3) on a tiny model made once per
module; the full sizes are checked without writing weights (yaml sections, and for CosyVoice3
every checkpoint key and shape from a meta-device build).
"""
import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyvoice.frontend.speech_models import PromptFeatureExtractor
from cosyvoice.frontend.tokenizer import END_OF_PROMPT, QwenTokenizer
from cosyvoice.loading.generations import COSYVOICE2, COSYVOICE3, GENERATIONS
from cosyvoice.loading.model_dir import (CHECKPOINTS, QWEN2_0_5B, QWEN_DIR, build_stage, load_model, open_model_dir,
                                         read_config, required_files)
from cosyvoice.tools.make_model import (DEFAULT_GENERATION, add_make_model_command, make_model, preset, run,
                                        write_yaml)

STAGE_KEYS = ("llm", "flow", "hift", "get_tokenizer", "allowed_special", "feat_extractor", "sample_rate",
              "token_frame_rate", "token_mel_ratio", "chunk_size", "spk_embed_dim")
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
OFFICIAL_YAMLS = {COSYVOICE2.name: SHARED / "configs" / "cosyvoice2.yaml",
                  COSYVOICE3.name: SHARED / "configs" / "cosyvoice3.yaml"}
CV3_FULL_SIZE_KEYS = SHARED / "cosyvoice3-tiny" / "reference" / "full_size_keys.json"

by_generation = pytest.mark.parametrize("generation", GENERATIONS, ids=[g.name for g in GENERATIONS])


def shared_file(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} is missing (the shared fixtures are not next to this checkout)")
    return path


@pytest.fixture(scope="module", params=GENERATIONS, ids=[g.name for g in GENERATIONS])
def tiny(request, tmp_path_factory):
    """(generation, directory) of a tiny model made with seed 0."""
    generation = request.param
    path = make_model(tmp_path_factory.mktemp("make_model") / "tiny", size="tiny", seed=0, generation=generation)
    return generation, path


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_make_model_command(parser.add_subparsers())
    return parser.parse_args(argv)


def test_directory_has_the_official_layout(tiny):
    generation, path = tiny
    assert open_model_dir(path).generation is generation
    for name in required_files(generation) + ("configuration.json", "spk2info.pt",
                                              f"{QWEN_DIR}/generation_config.json"):
        assert (path / name).is_file(), name
    assert not (path / QWEN_DIR / "tokenizer.json").exists()
    # One generation's files only: the official loader picks the first yaml it finds.
    others = [g for g in GENERATIONS if g is not generation]
    assert not any((path / g.yaml_name).exists() or (path / g.speech_tokenizer).exists() for g in others)


def test_checkpoints_keep_the_official_key_layout(tiny):
    _, path = tiny
    llm = torch.load(path / "llm.pt", weights_only=True)
    assert torch.equal(llm["llm.model.lm_head.weight"], llm["llm.model.model.embed_tokens.weight"])
    hift = torch.load(path / "hift.pt", weights_only=True)
    assert "conv_pre.parametrizations.weight.original0" in hift
    assert "conv_pre.parametrizations.weight.original1" in hift
    assert not any(key.startswith("generator.") for key in hift)


@pytest.mark.parametrize("tiny", [COSYVOICE3], ids=[COSYVOICE3.name], indirect=True)
def test_cosyvoice3_tiny_has_the_fixture_structure(tiny, cv3_model_dir):
    """Same stages and key names as the upstream-made CosyVoice3 tiny fixture; the widths are the
    fixture's too except where the fixture differs on purpose (its padded Qwen vocabulary, its two
    HiFT resblock kernels: ours keeps the official three)."""
    _, path = tiny
    for stage, filename in CHECKPOINTS.items():
        ours = torch.load(path / filename, weights_only=True)
        theirs = torch.load(cv3_model_dir / filename, weights_only=True, mmap=True)
        if stage == "hift":
            ours = {k: v for k, v in ours.items() if not k.startswith("resblocks.")}
            theirs = {k: v for k, v in theirs.items() if not k.startswith("resblocks.")}
        assert ours.keys() == theirs.keys(), stage
        vocab = ("llm.model.model.embed_tokens.weight", "llm.model.lm_head.weight")
        assert {k: v.shape for k, v in ours.items() if k not in vocab} == \
               {k: v.shape for k, v in theirs.items() if k not in vocab}, stage


def test_model_loads_and_synthesises_finite_audio(tiny):
    generation, path = tiny
    stages = load_model(path)
    tokenizer = QwenTokenizer(path / QWEN_DIR, generation.special_tokens)
    text = "Hello, 你好 123."
    if generation is COSYVOICE3:
        text = "You are a helpful assistant." + END_OF_PROMPT + text
    text_ids = torch.tensor([tokenizer.encode(text)], dtype=torch.int32)
    empty = torch.zeros(1, 0, dtype=torch.int32)
    generator = torch.Generator().manual_seed(0)
    tokens = list(itertools.islice(stages.llm.generate(text_ids, empty, empty, generator=generator), 10))
    assert len(tokens) == 10 and all(0 <= t < 6561 for t in tokens)

    mel = stages.flow.inference(torch.tensor([tokens]), empty, torch.zeros(1, 0, 80), torch.randn(1, 192),
                                streaming=False, finalize=True)
    assert mel.shape == (1, 80, 20)
    if generation is COSYVOICE3:
        speech, _ = stages.hift.inference(mel, finalize=True)   # no RNG: fixed noise buffers
    else:
        speech, _ = stages.hift.inference(mel, generator=generator)
    assert speech.shape == (1, 20 * 480)
    assert torch.isfinite(speech).all() and speech.abs().max() <= 0.99 and speech.std() > 0


def test_tokenizer_encodes_chinese_english_digits_and_special_tokens(tiny):
    generation, path = tiny
    tokenizer = QwenTokenizer(path / QWEN_DIR, generation.special_tokens)
    vocab_size = json.loads((path / QWEN_DIR / "config.json").read_text())["vocab_size"]
    end_of_text = tokenizer.token_id("<|endoftext|>")
    assert [tokenizer.token_id(t) for t in generation.special_tokens] == list(range(end_of_text + 1, len(tokenizer)))
    assert len(tokenizer) <= vocab_size
    assert vocab_size % 64 == 0 and vocab_size - len(tokenizer) < 64
    for text in ("今天天气很好。", "Hello world!", "0123456789"):
        ids = tokenizer.encode(text)
        assert ids and max(ids) < end_of_text
    assert len(tokenizer.encode("0123456789")) == 10   # Qwen splits numbers into single digits
    # Special tokens are one id each, found by name (their ids are not the official ones).
    end_of_prompt = tokenizer.token_id(END_OF_PROMPT)
    ids = tokenizer.encode("You are a helpful assistant." + END_OF_PROMPT + "你好")
    assert ids.count(end_of_prompt) == 1
    if generation is COSYVOICE3:
        assert tokenizer.encode("[j][ǐ][AH0]") == [tokenizer.token_id(t) for t in ("[j]", "[ǐ]", "[AH0]")]


def test_frontend_runs_the_toy_onnx_models(tiny):
    generation, path = tiny
    mel_params = read_config(path / generation.yaml_name).resolve("feat_extractor").kwargs
    extractor = PromptFeatureExtractor(path, mel_params, token_mel_ratio=2,
                                       speech_tokenizer=path / generation.speech_tokenizer)
    noise = np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 0.1
    features = extractor.extract(noise, 16000)
    assert features.speech_tokens.shape == (1, 50)
    assert features.embedding.shape == (1, 192)
    assert features.speech_feat.shape == (1, 100, 80)
    tokens = features.speech_tokens
    assert tokens.min() >= 0 and tokens.max() < 6561 and len(np.unique(tokens)) > 10
    assert not np.array_equal(extractor.speech_tokens(noise * 0.5 + np.roll(noise, 7)), tokens)


def test_same_seed_writes_identical_files(tiny, tmp_path):
    generation, path = tiny
    again = tmp_path / "again"
    assert run(parse(["make-model", "--generation", generation.name, "--size", "tiny", "--out", str(again)])) == 0
    written = sorted(p.relative_to(path) for p in path.rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in written:
        assert (path / name).read_bytes() == (again / name).read_bytes(), name
    other = make_model(tmp_path / "other", seed=1, generation=generation)
    assert (other / "llm.pt").read_bytes() != (path / "llm.pt").read_bytes()


def test_refuses_a_directory_that_is_not_empty(tiny):
    with pytest.raises(FileExistsError):
        make_model(tiny[1])


@pytest.mark.parametrize("value, expected", [
    (None, DEFAULT_GENERATION), ("3", COSYVOICE3), ("CosyVoice3", COSYVOICE3), ("cosyvoice3", COSYVOICE3),
    ("2", COSYVOICE2), ("CosyVoice2", COSYVOICE2)])
def test_generation_option_takes_numbers_and_names(value, expected, tmp_path):
    argv = ["make-model", "--out", str(tmp_path)] + ([] if value is None else ["--generation", value])
    args = parse(argv)
    assert args.generation is expected and args.size == "tiny"


def test_default_generation_is_cosyvoice3():
    assert DEFAULT_GENERATION is COSYVOICE3


def test_unknown_generation_is_a_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exited:
        parse(["make-model", "--generation", "1", "--out", str(tmp_path)])
    assert exited.value.code == 2
    assert "CosyVoice2, CosyVoice3" in capsys.readouterr().err


@by_generation
def test_full_size_yaml_matches_the_official_model_sections(generation, tmp_path):
    write_yaml(tmp_path / generation.yaml_name, generation, preset(generation, "full"))
    ours = read_config(tmp_path / generation.yaml_name)
    official = read_config(shared_file(OFFICIAL_YAMLS[generation.name]))
    for key in STAGE_KEYS:
        assert ours.resolve(key) == official.resolve(key), key


@by_generation
def test_tiny_yaml_differs_from_full_only_in_sizes(generation, tmp_path):
    """The tiny template fills the same text: only numbers change, never a class or a key."""
    write_yaml(tmp_path / "full.yaml", generation, preset(generation, "full"))
    write_yaml(tmp_path / "tiny.yaml", generation, preset(generation, "tiny"))
    full, tiny = ((tmp_path / name).read_text().splitlines() for name in ("full.yaml", "tiny.yaml"))
    assert len(full) == len(tiny)
    for a, b in zip(full, tiny):
        if a != b:
            key_a, value_a = a.split(":", 1)
            key_b, value_b = b.split(":", 1)
            assert key_a == key_b and value_a.strip().strip("[]").isdigit() and value_b.strip().strip("[]").isdigit()


@pytest.mark.parametrize("stage", list(CHECKPOINTS))
def test_full_size_cosyvoice3_has_every_official_key_and_shape(stage, tmp_path):
    """Built on the meta device from our full-size yaml (no memory for weights): the state dict
    the official Fun-CosyVoice3-0.5B checkpoints must fill with strict key matching."""
    official = json.loads(shared_file(CV3_FULL_SIZE_KEYS).read_text())[stage]
    full = preset(COSYVOICE3, "full")
    assert full.qwen == QWEN2_0_5B
    write_yaml(tmp_path / COSYVOICE3.yaml_name, COSYVOICE3, full)
    config = read_config(tmp_path / COSYVOICE3.yaml_name)
    with torch.device("meta"):
        module = build_stage(config, stage, qwen_config=full.qwen)
    ours = {key: list(value.shape) for key, value in module.state_dict().items()}
    assert len(ours) == official["n_keys"]
    assert ours == official["keys"]
    assert sum(value.numel() for value in module.state_dict().values()) == official["n_elements_all_keys"]
