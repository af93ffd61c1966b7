"""The HF export of the LLM: transformers on the exported folder (with the bias applied) gives
SpeechLM's (CosyVoice2) and CosyVoice3LM's log-probs, the merged vocabulary maps back exactly for
both layouts, and the CLI writes it."""
import dataclasses
import gc
import json
import shutil

import pytest
import torch
from conftest import report_error
from transformers import AutoTokenizer, Qwen2ForCausalLM

from safetensors import safe_open

from cosyvoice.backends.hf_export import EXPORT_INFO_NAME, WEIGHTS_NAME, ExportInfo, export_hf, export_model_dir
from cosyvoice.backends.hf_model import export_lm_head_bias, load_exported
from cosyvoice.backends.vocab import MergedVocab
from cosyvoice.cli import main as cli_main
from cosyvoice.frontend.tokenizer import QwenTokenizer
from cosyvoice.loading.generations import COSYVOICE3
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
    with torch.inference_mode():   # logits of the last n + 1 positions only: [n + 1, rows]
        logits = model(input_ids=torch.tensor([ids]), logits_to_keep=len(continuation) + 1).logits[0]
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
    assert vocab.speech_offset == len(original)      # sizes come from the model dir
    assert len(tokenizer) == vocab.length and vocab.rows % 128 == 0 and vocab.rows >= vocab.length
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
    assert f"speech tokens <|s_0|>.. at ids {len(QwenTokenizer(model_dir / QWEN_DIR))}" in capsys.readouterr().out
    assert ExportInfo.read(out).dtype == "bfloat16"
    assert cli_main(["export-hf", "--model-dir", str(model_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


# ---- both layouts ---------------------------------------------------------------------------------


def test_vocab_layout_of_both_generations(tiny_llm, cv3_llm):
    """CosyVoice2: 3 stop ids after the codes, SOS/TASK_ID ids of their own (llm_embedding).
    CosyVoice3: 200 stop ids after the codes, SOS/TASK_ID among them (speech_embedding rows).
    Both at the official sizes: the fixture LLM's head with Qwen2-0.5B's tokenizer and table."""
    cv2 = dataclasses.replace(MergedVocab.for_llm(tiny_llm, 1), text_size=151663, qwen_rows=151936)
    assert (cv2.speech_offset, cv2.head_rows, cv2.stop_ids, cv2.eos_id, cv2.sos_id, cv2.task_id, cv2.length,
            cv2.rows) == (151663, 6564, (158224, 158225, 158226), 158224, 158227, 158228, 158229, 158336)
    assert cv2.added_token_names()[-5:] == ["<|eos1|>", "<|eos2|>", "<|eos3|>", "<|sos|>", "<|task_id|>"]

    cv3 = dataclasses.replace(MergedVocab.for_llm(cv3_llm, 1), text_size=151924, qwen_rows=151936)
    assert cv3.head_rows == cv3_llm.vocab_size == 6761
    assert (cv3.speech_offset, cv3.sos_id, cv3.eos_id, cv3.task_id, cv3.length, cv3.rows) == \
        (151924, 158485, 158486, 158487, 158685, 158720)
    assert cv3.stop_ids == tuple(range(158485, 158685)) and len(cv3.stop_ids) == 200
    assert cv3.eos_id == cv3.merged_id(cv3_llm.eos_token) and cv3.sos_id in cv3.stop_ids
    names = cv3.added_token_names()
    assert len(names) == 6761 and names[6560] == "<|s_6560|>"
    assert names[6561:6566] == ["<|sos|>", "<|eos1|>", "<|task_id|>", "<|fill|>", "<|eos5|>"]
    assert names[-1] == "<|eos200|>" and not any(name.startswith("<|s_") for name in names[6561:])
    assert [cv3.is_stop_id(i) for i in (158484, 158485, 158684, 158685)] == [False, True, True, False]
    assert [cv3.head_row(cv3.merged_id(row)) for row in (0, 6560, 6561, 6760)] == [0, 6560, 6561, 6760]
    for vocab, llm in ((cv2, tiny_llm), (cv3, cv3_llm)):   # the stop ids are exactly the LLM's
        assert [vocab.head_row(i) for i in vocab.stop_ids] == \
            [row for row in range(llm.vocab_size) if llm.is_stop_token(row)]
    text, prompt_text, prompt_speech = torch.tensor([[11, 151646]]), torch.tensor([[5]]), torch.tensor([[0, 6560]])
    assert cv3.prompt_ids(text, prompt_text, prompt_speech) == [158485, 5, 11, 151646, 158487, 151924, 158484]
    with pytest.raises(ValueError):
        cv3.prompt_ids(text, prompt_text, torch.tensor([[6561]]))   # a stop id is no prompt token
    with pytest.raises(ValueError):
        cv3.head_row(cv3.rows - 1)                                  # padding
    assert MergedVocab.from_dict(cv3.to_dict()) == cv3


def test_format_1_metadata_reads_as_cosyvoice2(tmp_path):
    """Exports written before the layout was parametrised (CosyVoice2 only) still load."""
    old = {"format": 1, "dtype": "float32", "weights_sha256": "ab", "text_size": 1520, "speech_size": 6561,
           "qwen_rows": 1536, "rows": 8192, "speech_offset": 1520, "stop_ids": [8081, 8082, 8083],
           "sos_id": 8084, "task_id": 8085}
    (tmp_path / EXPORT_INFO_NAME).write_text(json.dumps(old))
    info = ExportInfo.read(tmp_path)
    assert info.vocab == MergedVocab(1520, 6561, 1536) and info.generation == "CosyVoice2"
    assert info.head_bias and info.min_len_masked_rows == (6561,)


# ---- CosyVoice3 --------------------------------------------------------------------------------

FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24


def gamma(n):
    """The float32 rounding bound of an n-term sum, relative to the sum of the terms' magnitudes."""
    return n * FLOAT32_UNIT_ROUNDOFF / (1 - n * FLOAT32_UNIT_ROUNDOFF)


def float32_log_prob_bound(llm, inputs, continuation):
    """How far two float32 log-softmaxes of the same head on the same hidden states may differ
    when only their summation order differs. That is all that separates the export from
    CosyVoice3LM: transformers runs the same float32 body on the same embedding rows (so the
    same hidden states h); the head's product takes rows of a larger matrix W, and the normaliser
    sums over every row, the masked ones adding exp(-inf) = 0 exactly. A logit's H-term dot
    product may then move by gamma_H * (|W||h|), and the log of the normaliser's V-term sum by
    gamma_V plus the largest logit error: the bound is the two logit errors plus gamma_V."""
    with torch.inference_mode():
        prompt = llm.prompt_embeddings(*inputs)
        speech = llm.speech_embedding(continuation.long().reshape(1, -1))
        hidden, _ = llm.llm(torch.cat([prompt, speech], dim=1))
        hidden = hidden[0, prompt.shape[1] - 1:]                                   # [n + 1, H]
        weight = llm.llm_decoder.weight                                            # [V, H]
        magnitude = float((hidden.abs() @ weight.abs().T).max())
    return 2 * gamma(weight.shape[1]) * magnitude + gamma(weight.shape[0])


@pytest.fixture(scope="module")
def cv3_llm(cv3_model_dir):
    return load_stage(cv3_model_dir, "llm")


@pytest.fixture(scope="module")
def cv3_export(cv3_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-cv3") / "hf"
    return out, export_model_dir(cv3_model_dir, out)


@pytest.fixture(scope="module")
def cv3_exported(cv3_export):
    return load_exported(cv3_export[0])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cv3_exported_log_probs_match_cosyvoice3_lm(cv3_export, cv3_exported, cv3_llm, cv3_reference, layout):
    """Teacher-forced, over all 6761 head ids (codes, SOS/EOS/TASK_ID/FILL and the unused stop
    ids); every other id (text, padding) is impossible."""
    out, info = cv3_export
    ref = cv3_reference("llm")
    inputs, forced = layout_inputs(ref, layout), torch.from_numpy(ref["forced_tokens"])
    ours = cv3_llm.log_probs(cv3_llm.prompt_embeddings(*inputs), forced)
    theirs, other_max = hf_speech_log_probs(cv3_exported, info.vocab, *inputs, forced)
    bound = float32_log_prob_bound(cv3_llm, inputs, forced)
    abs_err, _ = report_error(f"hf export (cv3 tiny) {layout} log-probs", theirs, ours)
    report_error(f"hf export (cv3 tiny) {layout} log-probs vs the reference", theirs,
                 ref[f"{layout}_teacher_forced_logp"])
    print(f"[export] float32 summation-order bound {bound:.2e}")
    assert abs_err <= bound
    assert other_max == -float("inf"), "text ids and padding must be impossible"


def test_cv3_export_is_a_plain_qwen2_checkpoint(cv3_export, cv3_llm, cv3_reference):
    """No lm_head.bias (the head has none): stock transformers loads every weight, and its
    log-probs over the head ids are ours, but it leaves the text ids reachable; the mask bias
    (0 on the head, -inf elsewhere) is what load_exported and the logits processor apply."""
    out, info = cv3_export
    with safe_open(str(out / WEIGHTS_NAME), framework="pt") as weights:
        assert "lm_head.bias" not in weights.keys()
    stock, loading = Qwen2ForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and stock.lm_head.bias is None
    ref = cv3_reference("llm")
    inputs, forced = layout_inputs(ref, "zero_shot"), torch.from_numpy(ref["forced_tokens"])
    ours = cv3_llm.log_probs(cv3_llm.prompt_embeddings(*inputs), forced)
    head_only, other_max = hf_speech_log_probs(stock.eval(), info.vocab, *inputs, forced)
    renormalised = head_only.log_softmax(dim=-1)
    assert (renormalised - ours).abs().max() <= float32_log_prob_bound(cv3_llm, inputs, forced)
    assert other_max > -float("inf")
    bias = export_lm_head_bias(out)
    head = slice(info.vocab.speech_offset, info.vocab.speech_offset + info.vocab.head_rows)
    assert bias.shape == (info.vocab.rows,) and bool((bias[head] == 0).all())
    assert int(torch.isinf(bias).sum()) == info.vocab.rows - 6761


def test_cv3_export_files_and_metadata(cv3_export, cv3_llm):
    out, info = cv3_export
    vocab = info.vocab
    assert info.generation == "CosyVoice3" and info.head_bias is False
    assert info.min_len_masked_rows == (cv3_llm.min_len_masked_token,) == (6561,)   # SOS, as the reference
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["use_bias"] is False
    first = vocab.speech_offset   # the tokenizer's length (the official one: 151924)
    assert config["vocab_size"] == vocab.rows and config["tie_word_embeddings"] is False
    assert config["eos_token_id"] == vocab.eos_id == first + 6562
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(range(first + 6561, first + 6761))
    assert generation["pad_token_id"] == first + 6562
    written = json.loads((out / EXPORT_INFO_NAME).read_text())
    assert written["stop_ids"] == list(vocab.stop_ids) and written["eos_id"] == first + 6562
    assert written["sos_id"] == first + 6561 and written["task_id"] == first + 6563
    assert ExportInfo.read(out) == info


def test_cv3_token_ids_map_back_exactly(cv3_export, cv3_model_dir):
    out, info = cv3_export
    vocab = info.vocab
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    original = QwenTokenizer(cv3_model_dir / QWEN_DIR, COSYVOICE3.special_tokens)
    first = len(original)   # 151924 for the official tokenizer
    assert vocab.speech_offset == first and len(tokenizer) == vocab.length == first + 6761
    named = {"<|s_0|>": first, "<|s_6560|>": first + 6560, "<|sos|>": first + 6561, "<|eos1|>": first + 6562,
             "<|task_id|>": first + 6563, "<|fill|>": first + 6564, "<|eos5|>": first + 6565,
             "<|eos200|>": first + 6760}
    for name, merged in named.items():
        assert tokenizer.convert_tokens_to_ids(name) == merged
        assert tokenizer.convert_ids_to_tokens(merged) == name
    for text in ("You are a helpful assistant.<|endofprompt|>今天天气很好。", "[breath]Hello [AA1] there[ǜ]"):
        assert tokenizer(text)["input_ids"] == original.encode(text)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False)
    assert tokenizer(chat + "<|s_7|>")["input_ids"] == vocab.prompt_ids(
        torch.tensor([original.encode("你好")]), torch.zeros(1, 0, dtype=torch.long), torch.tensor([[7]]))


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
