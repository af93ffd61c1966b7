"""The yaml reader: hyperpyyaml tags, references with arithmetic, clear errors."""
import pytest

from cosyvoice.loading.config import Apply, ConfigError, Name, New, YamlConfig
from cosyvoice.loading.model_dir import read_config


def _config(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return YamlConfig.from_file(path)


def test_tags_parse_into_records_without_running_anything(tmp_path):
    cfg = _config(tmp_path, """
seed: !apply:torch.manual_seed [1986]
size: 4
ratio: 2
model: !new:pkg.Model
    width: !ref <size>
    chunk: !ref <size> * <ratio> + 1
    act: !name:pkg.gelu
        approximate: none
    eps: 1e-06
""")
    assert cfg.tree["seed"] == Apply("torch.manual_seed", [1986])
    model = cfg.resolve("model")
    assert isinstance(model, New) and model.path == "pkg.Model"
    assert model.kwargs["width"] == 4
    assert model.kwargs["chunk"] == 9
    assert model.kwargs["act"] == Name("pkg.gelu", {"approximate": "none"})
    assert model.kwargs["eps"] == pytest.approx(1e-6)


def test_overrides_replace_a_key_before_resolution(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("path: ''\nuser: !ref <path>\n")
    assert YamlConfig.from_file(path, {"path": "/models/qwen"}).resolve("user") == "/models/qwen"


@pytest.mark.parametrize("text, message", [
    ("a: !ref <b>\n", "missing key 'b'"),
    ("a: !ref <b>\nb: !ref <a>\n", "circular"),
    ("a: !ref <b> + __import__('os')\nb: 1\n", "unsupported expression"),
    ("a: !ref <b> * 2\nb: text\n", "non-number"),
])
def test_bad_references_are_clear_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, text).resolve("a")


def test_official_yaml_resolves_the_decoder_chunk_arithmetic(model_dir):
    cfg = read_config(model_dir / "cosyvoice2.yaml", qwen_path=model_dir / "CosyVoice-BlankEN")
    flow = cfg.resolve("flow")
    estimator = flow.kwargs["decoder"].kwargs["estimator"]
    assert estimator.kwargs["static_chunk_size"] == cfg.resolve("chunk_size") * cfg.resolve("token_mel_ratio")
    assert cfg.resolve("llm").kwargs["llm"].kwargs["pretrain_path"].endswith("CosyVoice-BlankEN")
