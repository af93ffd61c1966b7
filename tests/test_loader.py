"""Model-directory loading: the official layout, the full-size model, and broken directories."""
import shutil
from pathlib import Path

import pytest
import torch

from cosyvoice.loading.model_dir import (QWEN2_0_5B, ModelDirError, build_stage, load_model, load_stage,
                                         open_model_dir, read_config)
from conftest import DEFAULT_FIXTURES

FULL_SIZE_YAML = DEFAULT_FIXTURES.parent / "configs" / "cosyvoice2.yaml"


@pytest.fixture
def model_copy(model_dir, tmp_path) -> Path:
    """A writable copy of the fixture model directory (large files are symlinked)."""
    copy = tmp_path / "model"
    copy.mkdir()
    for item in model_dir.iterdir():
        if item.is_dir():
            shutil.copytree(item, copy / item.name)
        else:
            (copy / item.name).symlink_to(item)
    return copy


def _replace(path: Path, data: bytes | None = None, state: dict | None = None):
    path.unlink()
    if state is not None:
        torch.save(state, path)
    else:
        path.write_bytes(data)


def test_fixture_directory_loads_every_stage(model_dir):
    stages = load_model(model_dir)
    assert stages.settings.mel["sampling_rate"] == stages.settings.sample_rate
    assert stages.settings.mel["hop_size"] * stages.settings.token_frame_rate * stages.settings.token_mel_ratio \
        == stages.settings.sample_rate
    for module in (stages.llm, stages.flow, stages.hift):
        assert not module.training


def test_loaded_llm_keeps_one_tied_embedding_and_head(model_dir):
    """Built on meta then materialised, the Qwen body must still share its token embedding with
    its (unused) text head, as the config ties them, instead of holding a second copy."""
    qwen = load_stage(model_dir, "llm").llm.model
    assert qwen.config.tie_word_embeddings
    assert qwen.lm_head.weight.data_ptr() == qwen.model.embed_tokens.weight.data_ptr()


def test_missing_directory(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        open_model_dir(tmp_path / "nowhere")


def test_missing_file_is_named(model_copy):
    (model_copy / "hift.pt").unlink()
    (model_copy / "campplus.onnx").unlink()
    with pytest.raises(ModelDirError, match=r"missing hift\.pt, campplus\.onnx"):
        load_model(model_copy)


def test_other_cosyvoice_generation_is_recognised(tmp_path):
    shutil.copy(FULL_SIZE_YAML.parent / "cosyvoice.yaml", tmp_path / "cosyvoice.yaml")
    with pytest.raises(ModelDirError, match="version 1"):
        open_model_dir(tmp_path)


def test_yaml_of_another_model_is_rejected(model_copy):
    _replace(model_copy / "cosyvoice2.yaml", (FULL_SIZE_YAML.parent / "cosyvoice3.yaml").read_bytes())
    with pytest.raises(ModelDirError, match="cosyvoice2.yaml describes a CosyVoice3 model, not CosyVoice2"):
        load_model(model_copy)


def test_unparsable_yaml(model_copy):
    _replace(model_copy / "cosyvoice2.yaml", b"llm: [unclosed\n")
    with pytest.raises(ModelDirError, match="not valid yaml"):
        load_stage(model_copy, "flow")


def test_truncated_checkpoint(model_copy, model_dir):
    data = (model_dir / "flow.pt").read_bytes()
    _replace(model_copy / "flow.pt", data[: len(data) // 2])
    with pytest.raises(ModelDirError, match=r"flow\.pt cannot be read.*truncated or corrupt"):
        load_stage(model_copy, "flow")


def test_checkpoint_with_missing_and_unexpected_keys(model_copy, model_dir):
    state = torch.load(model_dir / "llm.pt", weights_only=True)
    del state["llm_decoder.bias"]
    state["speaker_head.weight"] = torch.zeros(1)
    _replace(model_copy / "llm.pt", state=state)
    with pytest.raises(ModelDirError, match=r"llm\.pt does not match.*missing keys: llm_decoder\.bias; "
                                            r"unexpected keys: speaker_head\.weight"):
        load_stage(model_copy, "llm")


def test_checkpoint_with_wrong_shape(model_copy, model_dir):
    state = torch.load(model_dir / "flow.pt", weights_only=True)
    state["encoder_proj.bias"] = torch.zeros(3)
    _replace(model_copy / "flow.pt", state=state)
    with pytest.raises(ModelDirError, match=r"flow\.pt does not fit.*encoder_proj\.bias"):
        load_stage(model_copy, "flow")


def test_not_a_state_dict(model_copy):
    _replace(model_copy / "hift.pt", state={"generator": {"nested": torch.zeros(1)}})
    with pytest.raises(ModelDirError, match="not a state dict"):
        load_stage(model_copy, "hift")


# Names, shapes and sizes of the official CosyVoice2-0.5B checkpoints.
FULL_SIZE_KEY_COUNTS = {"llm": 295, "flow": 1121, "hift": 328}
FULL_SIZE_PARAMETERS = {"flow": 112_549_360, "hift": 20_821_295}
FULL_SIZE_SHAPES = {
    "llm": {
        "llm_embedding.weight": (2, 896),
        "llm.model.model.embed_tokens.weight": (151936, 896),
        "llm.model.model.layers.23.self_attn.q_proj.bias": (896,),
        "llm.model.model.layers.0.self_attn.k_proj.weight": (128, 896),
        "llm.model.model.layers.0.self_attn.v_proj.bias": (128,),
        "llm.model.model.layers.0.self_attn.o_proj.weight": (896, 896),
        "llm.model.model.layers.0.mlp.gate_proj.weight": (4864, 896),
        "llm.model.model.layers.0.mlp.down_proj.weight": (896, 4864),
        "llm.model.model.layers.0.post_attention_layernorm.weight": (896,),
        "llm.model.model.norm.weight": (896,),
        "llm.model.lm_head.weight": (151936, 896),
        "llm_decoder.weight": (6564, 896),
        "llm_decoder.bias": (6564,),
        "speech_embedding.weight": (6564, 896),
    },
    "flow": {
        "input_embedding.weight": (6561, 512),
        "spk_embed_affine_layer.weight": (80, 192),
        "encoder.embed.out.0.weight": (512, 512),
        "encoder.pre_lookahead_layer.conv1.weight": (512, 512, 4),
        "encoder.pre_lookahead_layer.conv2.weight": (512, 512, 3),
        "encoder.encoders.5.self_attn.linear_pos.weight": (512, 512),
        "encoder.encoders.0.self_attn.pos_bias_u": (8, 64),
        "encoder.encoders.0.feed_forward.w_1.weight": (2048, 512),
        "encoder.up_layer.conv.weight": (512, 512, 5),
        "encoder.up_encoders.3.norm_ff.bias": (512,),
        "encoder.after_norm.weight": (512,),
        "encoder_proj.weight": (80, 512),
        "decoder.estimator.time_mlp.linear_1.weight": (1024, 320),
        "decoder.estimator.down_blocks.0.0.block1.block.0.weight": (256, 320, 3),
        "decoder.estimator.down_blocks.0.0.res_conv.weight": (256, 320, 1),
        "decoder.estimator.down_blocks.0.1.3.attn1.to_q.weight": (512, 256),
        "decoder.estimator.down_blocks.0.1.0.ff.net.0.proj.weight": (1024, 256),
        "decoder.estimator.down_blocks.0.2.weight": (256, 256, 3),
        "decoder.estimator.mid_blocks.11.0.res_conv.weight": (256, 256, 1),
        "decoder.estimator.up_blocks.0.0.block1.block.0.weight": (256, 512, 3),
        "decoder.estimator.final_block.block.0.weight": (256, 256, 3),
        "decoder.estimator.final_proj.weight": (80, 256, 1),
    },
    "hift": {
        "m_source.l_linear.weight": (1, 9),
        "conv_pre.parametrizations.weight.original0": (512, 1, 1),
        "conv_pre.parametrizations.weight.original1": (512, 80, 7),
        "ups.0.parametrizations.weight.original1": (512, 256, 16),
        "ups.2.parametrizations.weight.original0": (128, 1, 1),
        "source_downs.0.weight": (256, 18, 30),
        "source_downs.2.weight": (64, 18, 1),
        "source_resblocks.2.convs1.0.parametrizations.weight.original1": (64, 64, 11),
        "resblocks.8.activations2.2.alpha": (64,),
        "conv_post.parametrizations.weight.original1": (18, 64, 7),
        "f0_predictor.condnet.8.parametrizations.weight.original1": (512, 512, 3),
        "f0_predictor.classifier.weight": (1, 512),
    },
}


@pytest.mark.parametrize("stage", ["llm", "flow", "hift"])
def test_full_size_model_from_the_official_yaml(stage):
    config = read_config(FULL_SIZE_YAML)
    module = build_stage(config, stage, qwen_config=QWEN2_0_5B)
    state = module.state_dict()
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    unique = {p.data_ptr(): p.numel() for p in module.parameters()}
    print(f"[full-size] {stage}: {len(state)} tensors, {sum(unique.values()):,} parameters")
    assert len(state) == FULL_SIZE_KEY_COUNTS[stage]
    for name, shape in FULL_SIZE_SHAPES[stage].items():
        assert shapes.get(name) == shape, name
    if stage in FULL_SIZE_PARAMETERS:
        assert sum(unique.values()) == FULL_SIZE_PARAMETERS[stage]
    else:
        assert 505_000_000 < sum(unique.values()) < 507_000_000  # tied Qwen head counted once
