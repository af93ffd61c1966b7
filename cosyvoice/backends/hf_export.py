"""Exports the LLM (CosyVoice2 or CosyVoice3) as a Hugging Face Qwen2ForCausalLM directory with a
merged vocabulary (layout in `vocab.py`), so runtimes that take HF checkpoints (TensorRT-LLM) can
run it.

    python -m cosyvoice export-hf --model-dir pretrained_models/CosyVoice2-0.5B --out DIR

    DIR/model.safetensors        model.* (the Qwen body), model.embed_tokens.weight [rows, H],
                                 lm_head.weight [rows, H], and lm_head.bias [rows] where the
                                 speech head has a bias (CosyVoice2; CosyVoice3's has none)
    DIR/config.json              CosyVoice-BlankEN's config with vocab_size = rows, untied head,
                                 eos_token_id = EOS
    DIR/generation_config.json   stops on every extra id (3 for CosyVoice2, 200 for CosyVoice3)
    DIR/tokenizer.json, tokenizer_config.json   Qwen + the generation's specials + the export's tokens
    DIR/cosyvoice_export.json    the vocabulary layout, the stop ids, the id masked below the
                                 minimum length, and the sha256 of model.safetensors

Embedding rows: Qwen's text rows, then the speech embedding over the speech-head ids (for
CosyVoice3 these hold SOS and TASK_ID), then CosyVoice2's SOS and TASK_ID. lm_head is zero except
on the speech-head ids, where it is the speech head (`llm_decoder`).

Only the speech-head ids may ever be sampled: every other row (text, CosyVoice2's prompt markers,
padding) is masked. CosyVoice2's export carries the mask in `lm_head.bias` (-inf there, the head's
bias on the head ids); CosyVoice3's is a plain bias-free Qwen2ForCausalLM and the mask is the
reader's: `hf_model.export_lm_head_bias` gives the same [rows] bias for both, which
`hf_model.load_exported` attaches for transformers and the logits processor
(`speech_sampler`) applies for TensorRT-LLM (whose Qwen lm_head, like stock transformers', has no
bias). A softmax over all rows then equals ours over the speech head, the extra ids included: all
of them stop generation, so an unused CosyVoice3 id (6565..6760) ends it, as in the reference's
PyTorch and vLLM paths, and never reaches the flow.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from ..loading.generations import COSYVOICE2, COSYVOICE3, Generation
from ..loading.model_dir import QWEN_DIR, ModelDir, load_stage, open_model_dir
from ..models.llm import CosyVoice3LM, SpeechLM
from .vocab import MergedVocab

WEIGHTS_NAME = "model.safetensors"
EXPORT_INFO_NAME = "cosyvoice_export.json"
EXPORT_FORMAT = 2
READABLE_FORMATS = (1, 2)   # 1: CosyVoice2 only, before the layout was parametrised (same files)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Chat template of the spec's format: a user turn is the text between SOS and TASK_ID; an
# assistant turn (speech tokens as <|s_N|> text) is written as it is.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '<|sos|>' + message['content'] + '<|task_id|>' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}"
    "{%- else -%}{{ raise_exception('only user and assistant turns are supported') }}"
    "{%- endif -%}{%- endfor -%}"
)


@dataclass(frozen=True)
class ExportInfo:
    """What `cosyvoice_export.json` records."""
    vocab: MergedVocab
    dtype: str
    weights_sha256: str
    generation: str = COSYVOICE2.name
    head_bias: bool = True                       # lm_head.bias is in the weights
    min_len_masked_rows: tuple[int, ...] = ()    # head rows blocked below the minimum length

    def __post_init__(self):
        if not self.min_len_masked_rows:         # an export of format 1: CosyVoice2's EOS
            object.__setattr__(self, "min_len_masked_rows", (self.vocab.eos_row,))

    def to_json(self) -> dict:
        v = self.vocab
        return {"format": EXPORT_FORMAT, "generation": self.generation, "dtype": self.dtype,
                "weights_sha256": self.weights_sha256, **v.to_dict(), "rows": v.rows,
                "speech_offset": v.speech_offset, "eos_id": v.eos_id, "stop_ids": list(v.stop_ids),
                "sos_id": v.sos_id, "task_id": v.task_id, "head_bias": self.head_bias,
                "min_len_masked_rows": list(self.min_len_masked_rows)}

    @classmethod
    def read(cls, export_dir: str | Path) -> "ExportInfo":
        path = Path(export_dir) / EXPORT_INFO_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{export_dir} is not a CosyVoice HF export (no {EXPORT_INFO_NAME}); "
                                    "make one with: python -m cosyvoice export-hf")
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") not in READABLE_FORMATS:
            raise ValueError(f"{path}: export format {data.get('format')} is not {EXPORT_FORMAT}; "
                             "export the model again")
        return cls(MergedVocab.from_dict(data), data["dtype"], data["weights_sha256"],
                   data.get("generation", COSYVOICE2.name), data.get("head_bias", True),
                   tuple(data.get("min_len_masked_rows", ())))


def generation_of(llm: SpeechLM) -> Generation:
    return COSYVOICE3 if isinstance(llm, CosyVoice3LM) else COSYVOICE2


def min_len_masked_rows(llm: SpeechLM) -> tuple[int, ...]:
    """`llm.min_len_masked_token` (one head row, or several) as a tuple of rows."""
    masked = llm.min_len_masked_token
    rows = (int(masked),) if isinstance(masked, int) else tuple(int(row) for row in masked)
    if not rows or not all(0 <= row < llm.vocab_size for row in rows):
        raise ValueError(f"{type(llm).__name__}.min_len_masked_token {masked!r} is not a head row")
    return rows


def cosyvoice_tokenizer(qwen_dir: Path, special_tokens: list[str]):
    """CosyVoice-BlankEN's tokenizer with a generation's special tokens (as the frontend builds it)."""
    tokenizer = AutoTokenizer.from_pretrained(str(qwen_dir))
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                                  "additional_special_tokens": list(special_tokens)})
    return tokenizer


def merged_tokenizer(qwen_dir: Path, llm: SpeechLM, special_tokens: list[str]):
    """(tokenizer with the export's tokens added, the vocabulary layout it realises)."""
    tokenizer = cosyvoice_tokenizer(qwen_dir, special_tokens)
    vocab = MergedVocab.for_llm(llm, len(tokenizer))
    names = vocab.added_token_names()
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if len(tokenizer) != vocab.length or ids != list(range(vocab.speech_offset, vocab.length)):
        raise RuntimeError(f"{qwen_dir}: adding the speech tokens gave ids {ids[0]}..{ids[-1]} and "
                           f"length {len(tokenizer)}, expected {vocab.speech_offset}..{vocab.length - 1} "
                           "in order")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer, vocab


def merged_weights(llm: SpeechLM, vocab: MergedVocab) -> dict[str, torch.Tensor]:
    """The HF Qwen2ForCausalLM state dict (float32 on the CPU) of the merged vocabulary, with
    lm_head.bias (-inf off the speech head) only when the speech head has a bias."""
    body = {name: tensor.detach().float().cpu() for name, tensor in llm.body.state_dict().items()}
    text_embed = body.pop("embed_tokens.weight")                           # [qwen_rows, H]
    hidden = text_embed.shape[1]
    first, last = vocab.speech_offset, vocab.speech_offset + vocab.head_rows
    embed = torch.zeros(vocab.rows, hidden)
    embed[:text_embed.shape[0]] = text_embed
    embed[first:last] = llm.speech_embedding.weight.detach().float().cpu()  # [S + E, H]
    sos, task_id = llm.special_embeddings()                                  # [1, 1, H] each
    embed[vocab.sos_id] = sos.detach().float().cpu().reshape(-1)    # for CosyVoice3 the same rows
    embed[vocab.task_id] = task_id.detach().float().cpu().reshape(-1)
    head_weight = torch.zeros(vocab.rows, hidden)
    head_weight[first:last] = llm.llm_decoder.weight.detach().float().cpu()
    state = {f"model.{name}": tensor for name, tensor in body.items()}
    state.update({"model.embed_tokens.weight": embed, "lm_head.weight": head_weight})
    if llm.llm_decoder.bias is not None:
        head_bias = torch.full((vocab.rows,), -float("inf"))
        head_bias[first:last] = llm.llm_decoder.bias.detach().float().cpu()
        state["lm_head.bias"] = head_bias
    return state


def merged_config(qwen_dir: Path, vocab: MergedVocab, dtype: str, head_bias: bool) -> dict:
    """CosyVoice-BlankEN's config.json with the export's changes only (so any transformers
    version, and TensorRT-LLM's, reads it as it reads the original)."""
    config = json.loads((qwen_dir / "config.json").read_text(encoding="utf-8"))
    config.update({"architectures": ["Qwen2ForCausalLM"], "vocab_size": vocab.rows,
                   "tie_word_embeddings": False, "use_bias": head_bias, "eos_token_id": vocab.eos_id,
                   "torch_dtype": dtype})
    return config


def generation_config(vocab: MergedVocab) -> dict:
    return {"eos_token_id": list(vocab.stop_ids), "pad_token_id": vocab.eos_id, "do_sample": True,
            "temperature": 1.0, "top_p": 0.8, "top_k": 25}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_hf(llm: SpeechLM, qwen_dir: str | Path, out_dir: str | Path,
              dtype: str = "float32", generation: Generation | None = None) -> ExportInfo:
    """Writes the export of `llm` (tokenizer and config from `qwen_dir`) to `out_dir`, which must
    not exist; the files appear under their final name only once complete. `generation` (whose
    special tokens the tokenizer gets) defaults to the one of the LLM's class."""
    qwen_dir, out_dir = Path(qwen_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another output folder")
    generation = generation or generation_of(llm)
    if generation is not generation_of(llm):
        raise ValueError(f"a {type(llm).__name__} is not the LLM of {generation.name}")
    tokenizer, vocab = merged_tokenizer(qwen_dir, llm, generation.special_tokens)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)   # left by an export that was killed
    partial.mkdir(parents=True)
    state = {name: tensor.to(DTYPES[dtype]).contiguous()
             for name, tensor in merged_weights(llm, vocab).items()}
    head_bias = "lm_head.bias" in state
    save_file(state, str(partial / WEIGHTS_NAME), metadata={"format": "pt"})
    del state
    write_json(partial / "config.json", merged_config(qwen_dir, vocab, dtype, head_bias))
    write_json(partial / "generation_config.json", generation_config(vocab))
    tokenizer.save_pretrained(str(partial))
    info = ExportInfo(vocab, dtype, file_sha256(partial / WEIGHTS_NAME), generation.name, head_bias,
                      min_len_masked_rows(llm))
    write_json(partial / EXPORT_INFO_NAME, info.to_json())
    partial.rename(out_dir)
    return info


def export_model_dir(model_dir: str | Path | ModelDir, out_dir: str | Path,
                     dtype: str = "float32") -> ExportInfo:
    """Exports the LLM of an official CosyVoice2 or CosyVoice3 model directory."""
    model = open_model_dir(model_dir)
    llm = load_stage(model, "llm")
    return export_hf(llm, model.path / QWEN_DIR, out_dir, dtype, model.generation)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    info = export_model_dir(args.model_dir, args.out, args.dtype)
    v = info.vocab
    print(f"exported {info.generation} {args.model_dir} to {args.out} in "
          f"{time.perf_counter() - started:.1f} s ({info.dtype}): {v.rows} rows, speech tokens "
          f"<|s_0|>.. at ids {v.speech_offset}.., stops {v.stop_ids[0]}..{v.stop_ids[-1]} "
          f"(eos {v.eos_id}), sos {v.sos_id}, task_id {v.task_id}")
    return 0


def add_export_command(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser(
        "export-hf", help="export the LLM as a Hugging Face Qwen2 checkpoint with a merged vocabulary")
    command.add_argument("--model-dir", type=Path, required=True,
                         help="CosyVoice2 or CosyVoice3 model directory")
    command.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    command.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                         help="weight type written (float32: exact; the runtime may cast)")
    command.set_defaults(run=run)
