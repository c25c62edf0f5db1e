"""`lmforge export RUN --to hf OUT`: a run's checkpoint as a transformers model directory.

GPT runs -> GPT2LMHeadModel (gpt2 layout) or LlamaForCausalLM (llama layout; Qwen3ForCausalLM with
qk_norm), T5 runs ->
T5ForConditionalGeneration (lmforge/interop/hf_t5.py), BERT runs -> BertForPreTraining (which
BertForMaskedLM and BertForSequenceClassification also load), fine-tuned BERT classifiers ->
BertForSequenceClassification and taggers (task.kind tokens) -> BertForTokenClassification, each with
their label names, span extractors (task.kind span) -> BertForQuestionAnswering; each with config.json,
model.safetensors and the tokenizer files, GPT and T5 models also with generation_config.json. Nothing
here needs transformers installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from lmforge.data.tokenizer import EOS, PAD
from lmforge.fileio import building_directory
from lmforge.errors import LmforgeError
from lmforge.interop.hf import bert_hf_config, bert_task_to_hf, gpt_hf_config, llama_hf_config, state_to_hf
from lmforge.interop.hf_tokenizer import write_tokenizer_files
from lmforge.model.config import ModelConfig

AUTO_CLASS = {"GPT2LMHeadModel": "AutoModelForCausalLM", "LlamaForCausalLM": "AutoModelForCausalLM",
              "Qwen3ForCausalLM": "AutoModelForCausalLM",
              "BertForPreTraining": "AutoModelForPreTraining",
              "BertForSequenceClassification": "AutoModelForSequenceClassification",
              "BertForTokenClassification": "AutoModelForTokenClassification",
              "BertForQuestionAnswering": "AutoModelForQuestionAnswering",
              "T5ForConditionalGeneration": "AutoModelForSeq2SeqLM"}


def architecture(config: ModelConfig) -> str:
    """The transformers class a pretraining model of this config exports as."""
    if config.family == "bert":
        return "BertForPreTraining"
    if config.family == "gpt":
        if config.layout == "llama":
            return "Qwen3ForCausalLM" if config.qk_norm else "LlamaForCausalLM"
        return "GPT2LMHeadModel"
    if config.family == "t5":
        return "T5ForConditionalGeneration"
    raise LmforgeError(f"no transformers export for model.family={config.family} (exportable: gpt, bert, t5)")


@dataclass
class Exported:
    out: Path
    architecture: str
    checkpoint: str
    files: list[str]

    @property
    def auto_class(self) -> str:
        """The transformers Auto class that loads it."""
        return AUTO_CLASS[self.architecture]


def _json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_dir(out: Path, hf_config: dict[str, Any], hf_state: dict[str, torch.Tensor], tokenizer: Tokenizer,
                 config: ModelConfig, generation: Optional[dict[str, Any]] = None) -> list[str]:
    """Write a transformers model directory under a temporary name, then rename it to `out`."""
    with building_directory(out, "export") as tmp:
        _json(tmp / "config.json", hf_config)
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in hf_state.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_tokenizer_files(tokenizer, config.family, tmp, config.block_size)
        if generation is not None:
            _json(tmp / "generation_config.json", generation)
        files = sorted(p.name for p in tmp.iterdir())
    return files


def export_model(config: ModelConfig, state: dict[str, torch.Tensor], tokenizer: Tokenizer, out: Path) -> list[str]:
    """Our pretraining model -> a GPT2LMHeadModel / LlamaForCausalLM / BertForPreTraining /
    T5ForConditionalGeneration directory."""
    if config.family == "t5":
        from lmforge.interop.hf_t5 import export_t5
        from lmforge.model.t5 import T5

        with torch.device("meta"):  # the weights are `state`'s own tensors, not copies
            model = T5(config)
        model.load_state_dict(state, assign=True)
        return export_t5(model, out, tokenizer)
    if config.family == "gpt":
        eos = tokenizer.token_to_id(EOS)
        if eos is None:
            raise LmforgeError(f"the run's tokenizer has no {EOS} token, which the exported config names as its "
                               f"begin/end of text")
        hf_config = (llama_hf_config if config.layout == "llama" else gpt_hf_config)(config, eos)
        generation = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    else:
        hf_config, generation = bert_hf_config(config, pad_token_id=tokenizer.token_to_id(PAD) or 0), None
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise LmforgeError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, more than model.vocab_size="
                           f"{config.vocab_size}")
    return write_hf_dir(out, hf_config, state_to_hf(state, config), tokenizer, config, generation)


# What each fine-tuned run exports as, for the message refusing the rest.
EXPORTABLE_FINETUNES = ("BERT classification / regression -> BertForSequenceClassification, BERT tokens -> "
                        "BertForTokenClassification, BERT span -> BertForQuestionAnswering, generation / seq2seq "
                        "-> the model itself")


def export_task_model(config: ModelConfig, state: dict[str, torch.Tensor], kind: str, labels: list[str],
                      tokenizer: Tokenizer, out: Path) -> tuple[str, list[str]]:
    """A fine-tuned BERT task model (classifier, regressor, tagger, span extractor) -> its transformers
    class's directory with the label names. Returns the class name and the files."""
    if config.family != "bert":
        # GPT2ForSequenceClassification has no bias in its head and finds the last token by a padding token
        # our GPT tokenizers do not have: it would not compute what our classifier computes. GPT taggers and
        # span extractors are not mapped (nor checked against GPT2For{Token,QuestionAnswering} classes).
        raise LmforgeError(f"no transformers export for a {config.family} run fine-tuned for task.kind={kind}; "
                           f"exportable: {EXPORTABLE_FINETUNES}")
    hf_config, hf_state = bert_task_to_hf(config, state, kind, labels, pad_token_id=tokenizer.token_to_id(PAD) or 0)
    return hf_config["architectures"][0], write_hf_dir(out, hf_config, hf_state, tokenizer, config)


def export_run(run_dir: Path, out: Path, checkpoint: Optional[str] = None) -> Exported:
    """A run's newest (or named) checkpoint -> a transformers directory at `out`. A fine-tuned run
    (lmforge finetune) exports its best checkpoint: a BERT task model with its label names, or the
    model itself (generation, seq2seq)."""
    from lmforge.run import load_run
    from lmforge.tasks.finetune import is_finetune_run, load_finetuned

    if is_finetune_run(run_dir):
        tuned = load_finetuned(run_dir, checkpoint)
        config, task = tuned.config.model, tuned.config.task
        if task.kind in ("generation", "seq2seq") or config.family == "t5":  # the pretraining model, trained on
            files = export_model(config, tuned.model.state_dict(), tuned.tokenizer, out)
            return Exported(out, architecture(config), tuned.checkpoint.path.name, files)
        if config.family == "bert" and task.kind in ("classification", "regression") and tuned.model.pooling != "cls":
            # BertForSequenceClassification classifies the pooled [CLS] vector only.
            raise LmforgeError(f"{run_dir} was fine-tuned with finetune.pooling={tuned.config.finetune.pooling}; "
                               f"only [CLS]-pooled BERT classifiers export to transformers")
        labels = [task.name] if task.kind == "regression" else list(task.labels or [])
        name, files = export_task_model(config, tuned.model.state_dict(), task.kind, labels, tuned.tokenizer, out)
        return Exported(out, name, tuned.checkpoint.path.name, files)
    run = load_run(run_dir, checkpoint)
    name = architecture(run.config.model)
    files = export_model(run.config.model, run.model.state_dict(), run.tokenizer, out)
    return Exported(out, name, run.checkpoint.path.name, files)
