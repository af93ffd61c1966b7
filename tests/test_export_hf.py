"""The HF export of the LLM: transformers on the exported folder (with the bias applied) gives
SpeechLM's log-probs, the merged vocabulary maps back exactly, and the CLI writes it."""
import gc
import json
import shutil

import pytest
import torch
from conftest import report_error
from transformers import AutoTokenizer, Qwen2ForCausalLM

from cosyvoice.backends.hf_export import ExportInfo, export_hf, export_model_dir
from cosyvoice.backends.hf_model import load_exported
from cosyvoice.cli import main as cli_main
from cosyvoice.frontend.tokenizer import QwenTokenizer
from cosyvoice.loading.model_dir import QWEN2_0_5B, QWEN_DIR, build_stage, load_stage, read_config

LAYOUTS = ["zero_shot", "cross_lingual", "instruct2"]
FULL_YAML = "configs/cosyvoice2.yaml"
TOLERANCE = 1e-4


def hf_speech_log_probs(model, vocab, text, prompt_text, prompt_speech, continuation):
    """Teacher-forced log-probs from the exported model: [n + 1, S + 3] over the speech head's
    ids, and the largest log-prob it gives any other id."""
    ids = vocab.prompt_ids(text, prompt_text, prompt_speech)
    n_prompt = len(ids)
    ids += [vocab.merged_id(int(token)) for token in continuation]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, n_prompt - 1:]    # [n + 1, rows]
    logp = logits.float().log_softmax(dim=-1)
    head = slice(vocab.speech_offset, vocab.speech_offset + vocab.head_rows)
    others = torch.cat([logp[:, :head.start], logp[:, head.stop:]], dim=1)
    return logp[:, head], float(others.max())


def layout_inputs(ref, layout):
    return (torch.from_numpy(ref[f"{layout}_text_ids"]), torch.from_numpy(ref[f"{layout}_prompt_text_ids"]),
            torch.from_numpy(ref[f"{layout}_prompt_speech_token"]))


@pytest.fixture(scope="module")
def tiny_export(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    return out, export_model_dir(model_dir, out)


@pytest.fixture(scope="module")
def tiny_llm(model_dir):
    return load_stage(model_dir, "llm")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_exported_log_probs_match_speech_lm(tiny_export, tiny_llm, reference, layout):
    out, info = tiny_export
    ref = reference("llm")
    inputs, forced = layout_inputs(ref, layout), torch.from_numpy(ref["forced_tokens"])
    ours = tiny_llm.log_probs(tiny_llm.prompt_embeddings(*inputs), forced)
    theirs, other_max = hf_speech_log_probs(load_exported(out), info.vocab, *inputs, forced)
    abs_err, _ = report_error(f"hf export (tiny) {layout} log-probs", theirs, ours)
    assert abs_err < TOLERANCE
    assert other_max == -float("inf"), "text ids and padding must be impossible"


def test_stock_transformers_drops_the_bias_and_our_loader_applies_it(tiny_export, tiny_llm, reference):
    out, info = tiny_export
    ref = reference("llm")
    inputs, forced = layout_inputs(ref, "zero_shot"), torch.from_numpy(ref["forced_tokens"])
    ours = tiny_llm.log_probs(tiny_llm.prompt_embeddings(*inputs), forced)
    stock = Qwen2ForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert stock.lm_head.bias is None
    without_bias, other_max = hf_speech_log_probs(stock, info.vocab, *inputs, forced)
    with_bias, _ = hf_speech_log_probs(load_exported(out), info.vocab, *inputs, forced)
    print(f"[export] without the bias: max diff {(without_bias - ours).abs().max():.3f}, "
          f"text ids reachable (max log-prob {other_max:.2f})")
    assert (without_bias - ours).abs().max() > 0.1
    assert other_max > -float("inf")
    assert (with_bias - ours).abs().max() < TOLERANCE


def test_token_ids_map_back_exactly(tiny_export, model_dir):
    out, info = tiny_export
    vocab = info.vocab
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    original = QwenTokenizer(model_dir / QWEN_DIR)
    assert vocab.speech_offset == len(original) == 1520      # sizes come from the model dir
    assert len(tokenizer) == vocab.length and vocab.rows == 8192
    named = {f"<|s_{s}|>": vocab.merged_id(s) for s in (0, 1, 4095, vocab.speech_size - 1)}
    named.update({"<|eos1|>": vocab.stop_ids[0], "<|eos2|>": vocab.stop_ids[1], "<|eos3|>": vocab.stop_ids[2],
                  "<|sos|>": vocab.sos_id, "<|task_id|>": vocab.task_id})
    for name, merged in named.items():
        assert tokenizer.convert_tokens_to_ids(name) == merged
        assert tokenizer.convert_ids_to_tokens(merged) == name
    assert [vocab.head_row(vocab.merged_id(row)) for row in range(vocab.head_rows)] == list(range(vocab.head_rows))
    assert tokenizer("<|s_12|><|s_6560|><|eos1|>")["input_ids"] == [vocab.merged_id(12), vocab.merged_id(6560),
                                                                   vocab.stop_ids[0]]
    for text in ("今天天气很好，我们一起去公园散步吧。", "Hello there, how are you?", "<|endofprompt|>[breath]"):
        assert tokenizer(text)["input_ids"] == original.encode(text)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False)
    assert chat == "<|sos|>你好<|task_id|>"
    with pytest.raises(ValueError):
        vocab.head_row(vocab.sos_id)


def test_export_files_and_metadata(tiny_export):
    out, info = tiny_export
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == info.vocab.rows and config["tie_word_embeddings"] is False
    assert config["eos_token_id"] == info.vocab.eos_id
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(info.vocab.stop_ids)
    assert ExportInfo.read(out) == info


def test_cli_exports_and_refuses_to_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli_main(["export-hf", "--model-dir", str(model_dir), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert "speech tokens <|s_0|>.. at ids 1520" in capsys.readouterr().out
    assert ExportInfo.read(out).dtype == "bfloat16"
    assert cli_main(["export-hf", "--model-dir", str(model_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


# ---- full size ---------------------------------------------------------------------------------


def write_full_size_qwen_folder(folder, tiny_qwen_dir):
    """A CosyVoice-BlankEN stand-in with the real sizes: Qwen2-0.5B's config and a tokenizer of
    151643 BPE entries (the tiny fixture's, padded with unreachable fillers) + 3 added tokens."""
    folder.mkdir()
    vocab = json.loads((tiny_qwen_dir / "vocab.json").read_text(encoding="utf-8"))
    n_bpe = 151643
    vocab.update({f"<filler_{i}>": i for i in range(len(vocab), n_bpe)})
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    shutil.copy(tiny_qwen_dir / "merges.txt", folder / "merges.txt")
    config = json.loads((tiny_qwen_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {str(n_bpe + i): entry
                                      for i, entry in enumerate(config["added_tokens_decoder"].values())}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    qwen = {**QWEN2_0_5B, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "bos_token_id": n_bpe, "eos_token_id": n_bpe}
    (folder / "config.json").write_text(json.dumps(qwen), encoding="utf-8")


@pytest.mark.slow
def test_full_size_export_matches_speech_lm(fixture_dir, model_dir, tmp_path):
    """Qwen2-0.5B sizes: 24 layers, 151936 Qwen rows, ids at the official offsets."""
    qwen_dir = tmp_path / QWEN_DIR
    write_full_size_qwen_folder(qwen_dir, model_dir / QWEN_DIR)
    torch.manual_seed(0)
    llm = build_stage(read_config(fixture_dir.parent / FULL_YAML), "llm", qwen_config=QWEN2_0_5B).eval()
    with torch.no_grad():   # a bias large enough that dropping it would show
        llm.llm_decoder.bias.normal_(0.0, 2.0)
    out = tmp_path / "hf"
    info = export_hf(llm, qwen_dir, out)
    vocab = info.vocab
    assert (vocab.speech_offset, vocab.eos_id, vocab.sos_id, vocab.task_id, vocab.rows) == \
        (151663, 158224, 158227, 158228, 158336)
    text, prompt_text = torch.tensor([[11, 300, 1024, 7, 1499]]), torch.tensor([[5, 6, 1503]])
    prompt_speech = torch.tensor([[0, 6560, 17, 4000, 42]])
    continuation = torch.tensor([3, 6000, 3, 128])
    ours = llm.log_probs(llm.prompt_embeddings(text, prompt_text, prompt_speech), continuation)
    del llm
    gc.collect()
    model = load_exported(out)
    assert model.lm_head.bias is not None and model.config.num_hidden_layers == 24
    theirs, other_max = hf_speech_log_probs(model, vocab, text, prompt_text, prompt_speech, continuation)
    abs_err, _ = report_error("hf export (full size) log-probs", theirs, ours)
    assert abs_err < TOLERANCE
    assert other_max == -float("inf")
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.convert_tokens_to_ids("<|s_0|>") == 151663
    assert tokenizer.convert_tokens_to_ids("<|task_id|>") == 158228
