"""Exports the CosyVoice2 LLM as a Hugging Face Qwen2ForCausalLM directory with a merged vocabulary
(layout in `vocab.py`), so runtimes that take HF checkpoints (TensorRT-LLM) can run it.

    python -m cosyvoice export-hf --model-dir pretrained_models/CosyVoice2-0.5B --out DIR

    DIR/model.safetensors        model.* (the Qwen body), model.embed_tokens.weight [rows, H],
                                 lm_head.weight [rows, H], lm_head.bias [rows]
    DIR/config.json              CosyVoice-BlankEN's config with vocab_size = rows, untied head
    DIR/generation_config.json   stops on <|eos1|>..<|eos3|>
    DIR/tokenizer.json, tokenizer_config.json   Qwen + CosyVoice2 specials + the export's tokens
    DIR/cosyvoice_export.json    the vocabulary layout and the sha256 of model.safetensors

Embedding rows: Qwen's text rows, then the speech embedding over the speech ids, then SOS and
TASK_ID. The head is zero with bias -inf except on the speech and stop ids, where it is the speech
head (`llm_decoder`): a softmax over all rows then equals ours over the speech head. Stock
transformers and TensorRT-LLM build a bias-free lm_head and drop `lm_head.bias`; whoever runs the
export must add it (`hf_model.load_exported` for transformers, the logits processor for
TensorRT-LLM).
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

from ..frontend.tokenizer import SPECIAL_TOKENS
from ..loading.model_dir import QWEN_DIR, load_stage
from ..models.llm import SOS_ROW, TASK_ID_ROW, SpeechLM
from .vocab import MergedVocab

WEIGHTS_NAME = "model.safetensors"
EXPORT_INFO_NAME = "cosyvoice_export.json"
EXPORT_FORMAT = 1
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

    def to_json(self) -> dict:
        v = self.vocab
        return {"format": EXPORT_FORMAT, "dtype": self.dtype, "weights_sha256": self.weights_sha256,
                **v.to_dict(), "rows": v.rows, "speech_offset": v.speech_offset,
                "stop_ids": list(v.stop_ids), "sos_id": v.sos_id, "task_id": v.task_id}

    @classmethod
    def read(cls, export_dir: str | Path) -> "ExportInfo":
        path = Path(export_dir) / EXPORT_INFO_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{export_dir} is not a CosyVoice2 HF export (no {EXPORT_INFO_NAME}); "
                                    "make one with: python -m cosyvoice export-hf")
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{path}: export format {data.get('format')} is not {EXPORT_FORMAT}; "
                             "export the model again")
        vocab = MergedVocab(data["text_size"], data["speech_size"], data["qwen_rows"])
        return cls(vocab, data["dtype"], data["weights_sha256"])


def cosyvoice_tokenizer(qwen_dir: Path):
    """CosyVoice-BlankEN's tokenizer with CosyVoice2's special tokens (as the frontend builds it)."""
    tokenizer = AutoTokenizer.from_pretrained(str(qwen_dir))
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                                  "additional_special_tokens": SPECIAL_TOKENS})
    return tokenizer


def merged_tokenizer(qwen_dir: Path, speech_size: int, qwen_rows: int):
    """(tokenizer with the export's tokens added, the vocabulary layout it realises)."""
    tokenizer = cosyvoice_tokenizer(qwen_dir)
    vocab = MergedVocab(len(tokenizer), speech_size, qwen_rows)
    tokenizer.add_tokens(vocab.added_token_names())
    first = tokenizer.convert_tokens_to_ids(vocab.added_token_names()[0])
    if len(tokenizer) != vocab.length or first != vocab.speech_offset:
        raise RuntimeError(f"{qwen_dir}: adding the speech tokens gave ids from {first} and length "
                           f"{len(tokenizer)}, expected {vocab.speech_offset} and {vocab.length}")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer, vocab


def merged_weights(llm: SpeechLM, vocab: MergedVocab) -> dict[str, torch.Tensor]:
    """The HF Qwen2ForCausalLM state dict (float32 on the CPU) of the merged vocabulary."""
    body = {name: tensor.detach().float().cpu() for name, tensor in llm.body.state_dict().items()}
    text_embed = body.pop("embed_tokens.weight")                           # [qwen_rows, H]
    hidden = text_embed.shape[1]
    first, last = vocab.speech_offset, vocab.speech_offset + vocab.head_rows
    embed = torch.zeros(vocab.rows, hidden)
    embed[:text_embed.shape[0]] = text_embed
    embed[first:last] = llm.speech_embedding.weight.detach().float().cpu()  # [S + 3, H]
    prompt_rows = llm.llm_embedding.weight.detach().float().cpu()            # [2, H]
    embed[vocab.sos_id] = prompt_rows[SOS_ROW]
    embed[vocab.task_id] = prompt_rows[TASK_ID_ROW]
    head_weight = torch.zeros(vocab.rows, hidden)
    head_weight[first:last] = llm.llm_decoder.weight.detach().float().cpu()
    head_bias = torch.full((vocab.rows,), -float("inf"))
    head_bias[first:last] = llm.llm_decoder.bias.detach().float().cpu()
    state = {f"model.{name}": tensor for name, tensor in body.items()}
    state.update({"model.embed_tokens.weight": embed, "lm_head.weight": head_weight,
                  "lm_head.bias": head_bias})
    return state


def merged_config(qwen_dir: Path, vocab: MergedVocab, dtype: str) -> dict:
    """CosyVoice-BlankEN's config.json with the export's changes only (so any transformers
    version, and TensorRT-LLM's, reads it as it reads the original)."""
    config = json.loads((qwen_dir / "config.json").read_text(encoding="utf-8"))
    config.update({"architectures": ["Qwen2ForCausalLM"], "vocab_size": vocab.rows,
                   "tie_word_embeddings": False, "use_bias": True, "eos_token_id": vocab.eos_id,
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
              dtype: str = "float32") -> ExportInfo:
    """Writes the export of `llm` (tokenizer and config from `qwen_dir`) to `out_dir`, which must
    not exist; the files appear under their final name only once complete."""
    qwen_dir, out_dir = Path(qwen_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another output folder")
    tokenizer, vocab = merged_tokenizer(qwen_dir, llm.speech_token_size,
                                        llm.body.embed_tokens.num_embeddings)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)   # left by an export that was killed
    partial.mkdir(parents=True)
    state = {name: tensor.to(DTYPES[dtype]).contiguous()
             for name, tensor in merged_weights(llm, vocab).items()}
    save_file(state, str(partial / WEIGHTS_NAME), metadata={"format": "pt"})
    del state
    write_json(partial / "config.json", merged_config(qwen_dir, vocab, dtype))
    write_json(partial / "generation_config.json", generation_config(vocab))
    tokenizer.save_pretrained(str(partial))
    info = ExportInfo(vocab, dtype, file_sha256(partial / WEIGHTS_NAME))
    write_json(partial / EXPORT_INFO_NAME, info.to_json())
    partial.rename(out_dir)
    return info


def export_model_dir(model_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> ExportInfo:
    """Exports the LLM of an official CosyVoice2 model directory."""
    model_dir = Path(model_dir)
    llm = load_stage(model_dir, "llm")
    return export_hf(llm, model_dir / QWEN_DIR, out_dir, dtype)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    info = export_model_dir(args.model_dir, args.out, args.dtype)
    v = info.vocab
    print(f"exported {args.model_dir} to {args.out} in {time.perf_counter() - started:.1f} s "
          f"({info.dtype}): {v.rows} rows, speech tokens <|s_0|>.. at ids {v.speech_offset}.., "
          f"stops {list(v.stop_ids)}, sos {v.sos_id}, task_id {v.task_id}")
    return 0


def add_export_command(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser(
        "export-hf", help="export the LLM as a Hugging Face Qwen2 checkpoint with a merged vocabulary")
    command.add_argument("--model-dir", type=Path, required=True, help="CosyVoice2 model directory")
    command.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    command.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                         help="weight type written (float32: exact; the runtime may cast)")
    command.set_defaults(run=run)
