"""`lmforge <verb>`: parse arguments, load configuration, call one function per verb.

User mistakes (LmforgeError) print one line and exit with code 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from lmforge.errors import LmforgeError

PEER_ERROR_GRACE_S = 10.0  # how long a non-zero rank waits for rank 0 to report a shared input error


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML recipe: a path, or the name of a shipped recipe "
                        "(default: shakespeare-char)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory")
    parser.add_argument("--checkpoint", help="checkpoint name, e.g. step-000500 (default: newest complete)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def cmd_prepare(args: argparse.Namespace) -> int:
    from lmforge.config import load_config
    from lmforge.data.prepare import prepare
    from lmforge.data.store import TokenStore

    overrides = [*args.overrides, *([f"data.executor={args.executor}"] if args.executor else []),
                 *([f"data.tasks={args.tasks}"] if args.tasks is not None else [])]
    config = load_config(args.config, overrides)
    if args.workers is not None and args.workers < 0:
        raise LmforgeError(f"--workers must be >= 0 (0 = one per CPU core), got {args.workers}")
    path = prepare(config.data, config.model.family, out=args.out, workers=args.workers)
    manifest = TokenStore(path).manifest
    splits = ", ".join(f"{name} {info['tokens']:,} tokens" for name, info in manifest["splits"].items())
    print(f"token store: {path} (vocab {manifest['vocab_size']:,}; {splits})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from lmforge.verify import verify

    checked, problems = verify(args.path)
    for line in checked:
        print(f"checked: {line}")
    for problem in problems:
        print(f"BAD: {problem}")
    if problems:
        raise LmforgeError(f"{args.path}: {len(problems)} problem{'s' if len(problems) > 1 else ''} found (listed above)")
    print(f"{args.path}: every checksum matches")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from lmforge.config import load_config
    from lmforge.report import plot_run
    from lmforge.run import load_run_config, sample_run
    from lmforge.train.device import resolve_device
    from lmforge.train.loop import describe_time
    from lmforge.train.pretrain import pretrain

    if args.resume:
        if args.config:
            raise LmforgeError("--resume continues a run with its own config.yaml; use --set to change values")
        run_dir = Path(args.resume)
        config = load_run_config(run_dir, args.overrides)
    else:
        config = load_config(args.config, args.overrides)
        run_dir = Path(args.out or Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    parts = {"start-up": time.perf_counter() - args.started}  # imports, config; pretrain adds its checks
    result = pretrain(config, run_dir, resume=bool(args.resume))
    parts["start-up"] += result.parts.pop("checks", 0.0)
    parts.update(result.parts)
    if result.interrupted_by is not None:
        if _is_main_process():
            print(f"stopped at step {result.step}; checkpoint written. Continue with:\n"
                  f"  {_launcher()} pretrain --resume {run_dir}")
        return 128 + result.interrupted_by
    if not _is_main_process():
        return 0
    began = time.perf_counter()
    plot_run(run_dir)
    parts["plots"] = time.perf_counter() - began
    sample = sample_run(run_dir, resolve_device(config.train.device))
    parts["sample"] = time.perf_counter() - began - parts["plots"]
    if sample is not None:
        (run_dir / "samples.txt").write_text(sample + "\n", encoding="utf-8")
        print("\n--- sample " + "-" * 60 + f"\n{sample}\n" + "-" * 71)
    if "val_mlm_loss" in result.val_metrics or "val_token_acc" in result.val_metrics:
        from lmforge.train.evaluate import describe_metrics

        shown = describe_metrics(result.val_metrics)
        print(f"validation: {shown}  (step {result.step}, {result.seconds:.0f}s)")
    else:
        val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
        print(f"validation loss: {val}  (step {result.step}, {result.seconds:.0f}s)")
    print(f"run directory: {run_dir}  (loss curve: {run_dir / 'plots' / 'loss.png'})")
    print(describe_time(time.perf_counter() - args.started, parts))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lmforge.data.loader import loader_for
    from lmforge.run import load_run, run_store
    from lmforge.train.device import resolve_device
    from lmforge.train.evaluate import describe_metrics, evaluate

    from lmforge.tasks.finetune import is_finetune_run

    if args.batches is not None and args.batches < 1:
        raise LmforgeError(f"--batches must be >= 1 (default: the run's train.eval_batches), got {args.batches}")
    if is_finetune_run(args.run):
        if args.text:
            raise LmforgeError("--text scores a pretrained run; a fine-tuned run is evaluated on its task's dev set")
        return evaluate_finetuned_run(args)
    device = resolve_device(args.device)
    run = load_run(args.run, args.checkpoint, device)
    tc = run.config.train
    if args.text:
        return _evaluate_text(args, run, device)
    store = run_store(args.run, run.config)
    loader = loader_for(run.config, store, args.split, training=False)
    measured = evaluate(run.model, loader, args.batches or tc.eval_batches, device, tc.precision, progress=True)
    result = {"checkpoint": run.checkpoint.path.name, "split": args.split,
              **{k.removeprefix("val_"): v for k, v in measured.items()}}
    if "ppl" in result:
        result["perplexity"] = result.pop("ppl")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{run.checkpoint.path.name}: {args.split} " + describe_metrics(measured))
    return 0


def _evaluate_text(args: argparse.Namespace, run, device) -> int:
    from lmforge.infer.score_text import read_texts, score_text

    score = score_text(run.model, run.tokenizer, run.config, read_texts(args.text), device, progress=True)
    result = {"checkpoint": run.checkpoint.path.name, "files": args.text, "documents": score.documents,
              "bytes": score.bytes, "tokens": score.tokens, "loss": score.loss, "bits_per_byte": score.bits_per_byte,
              "unknown_characters": score.unknown_characters}
    if score.accuracy is not None:
        result["masked_accuracy"] = score.accuracy
    else:
        result["perplexity"] = score.perplexity
    if args.json:
        print(json.dumps(result))
        return 0
    what = (f"masked accuracy {score.accuracy:.2%}, loss {score.loss:.4f} over {score.tokens:,} masked tokens"
            if score.accuracy is not None else
            f"loss {score.loss:.4f}, perplexity {score.perplexity:.2f} over {score.tokens:,} tokens")
    unknown = f"; {score.unknown_characters:,} characters unknown to the tokenizer" if score.unknown_characters else ""
    print(f"{run.checkpoint.path.name}: {what}, {score.bits_per_byte:.4f} bits per byte "
          f"({score.bytes:,} bytes in {score.documents:,} document{'s' if score.documents != 1 else ''}{unknown})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from lmforge.data.tokenizer import EOS, eos_id, warn_unknown
    from lmforge.infer.generate import beam_search, generate
    from lmforge.run import load_run
    from lmforge.train.device import resolve_device

    _check_sampling_flags(args)
    device = resolve_device(args.device)
    run = load_run(args.run, args.checkpoint, device)
    family = run.config.model.family
    if family == "bert":
        raise LmforgeError(f"generate needs a decoder (gpt) or encoder-decoder (t5) run; {args.run} is a bert run "
                           f"(try: lmforge fill-mask)")
    tokenizer = run.tokenizer
    encoding = tokenizer.encode(args.prompt, add_special_tokens=False)
    warn_unknown(tokenizer, [args.prompt], [encoding], "the prompt")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if family == "t5":
        from lmforge.run import fill_text

        if args.max_new_tokens < 1:
            raise LmforgeError(f"--max-new-tokens must be >= 1 for a t5 run, got {args.max_new_tokens}")
        for i in range(args.num_samples):
            if args.num_samples > 1:
                print(f"--- sample {i + 1}")
            print(fill_text(run.model, tokenizer, args.prompt, args.max_new_tokens, device, args.temperature,
                            args.top_k, args.top_p, args.beams, args.length_penalty, args.early_stopping, generator))
        return 0
    ids = encoding.ids or [eos_id(tokenizer)]
    if args.beams > 1:  # deterministic: one output; a hypothesis ends at the end-of-text token (a document's end)
        out = beam_search(run.model, torch.tensor([ids], device=device), args.max_new_tokens, args.beams,
                          args.length_penalty, args.early_stopping, stop_token=tokenizer.token_to_id(EOS))
        print(tokenizer.decode(out[0].tolist()))
        return 0
    for i in range(args.num_samples):
        out = generate(run.model, torch.tensor([ids], device=device), args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator)
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(tokenizer.decode(out[0].tolist()))
    return 0


def _check_sampling_flags(args: argparse.Namespace) -> None:
    """generate's numeric flags, before anything is loaded (a NaN compares False with every bound)."""
    from lmforge.config import check_seed

    if not 0 <= args.temperature < float("inf"):
        raise LmforgeError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 0:
        raise LmforgeError(f"--top-k must be >= 0 (0 = no top-k filtering), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise LmforgeError(f"--top-p must be in (0, 1] (1 = no nucleus filtering), got {args.top_p}")
    if args.max_new_tokens < 0:
        raise LmforgeError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise LmforgeError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.beams < 1:
        raise LmforgeError(f"--beams must be >= 1 (1 = no beam search), got {args.beams}")
    if not math.isfinite(args.length_penalty):
        raise LmforgeError(f"--length-penalty must be a finite number, got {args.length_penalty}")
    check_seed(args.seed, "--seed")


def cmd_fill_mask(args: argparse.Namespace) -> int:
    from lmforge.data.tokenizer import warn_unknown
    from lmforge.infer.fill_mask import describe, fill_mask
    from lmforge.run import load_run
    from lmforge.train.device import resolve_device

    if args.top_k < 1:
        raise LmforgeError(f"--top-k must be >= 1, got {args.top_k}")
    device = resolve_device(args.device)
    run = load_run(args.run, args.checkpoint, device)
    if run.config.model.family != "bert":
        raise LmforgeError(f"fill-mask needs a masked-LM (bert) run; {args.run} is a {run.config.model.family} run"
                           f" (try: lmforge generate)")
    warn_unknown(run.tokenizer, [args.text], [run.tokenizer.encode(args.text)], "the text")
    results = fill_mask(run.model, run.tokenizer, args.text, top_k=args.top_k, device=device)
    if args.json:
        print(json.dumps([[{"token": c.token, "probability": c.probability, "sequence": c.sequence} for c in slot]
                          for slot in results]))
    else:
        print(describe(results))
    return 0


def evaluate_finetuned_run(args: argparse.Namespace) -> int:
    """`lmforge evaluate` on a fine-tuned run: its best checkpoint's metrics on the task's dev split."""
    from lmforge.tasks.finetune import evaluate_finetuned

    run, measured = evaluate_finetuned(args.run, args.checkpoint, args.device)
    result = {"checkpoint": run.checkpoint.path.name, "split": "dev", "task": "+".join(t.name for t in run.config.tasks),
              **{k.removeprefix("val_"): v for k, v in measured.items()}}
    if args.json:
        print(json.dumps(result))
    else:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
        print(f"{result['checkpoint']}: {result['task']} dev {shown}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from lmforge.report import plot_run
    from lmforge.tasks.finetune import finetune, is_finetune_run, load_finetune_config, plan_finetune, write_samples
    from lmforge.train.device import resolve_device

    if args.resume:
        if args.run or args.task:
            raise LmforgeError("--resume continues a fine-tune with its own config.yaml; give only the run "
                               "directory (and --set to change values)")
        run_dir = Path(args.resume)
        if not is_finetune_run(run_dir):
            raise LmforgeError(f"not a fine-tuned run: {run_dir}")
        config = load_finetune_config(run_dir, args.overrides)
    else:
        if not args.run or not args.task:
            raise LmforgeError("usage: lmforge finetune RUN --task TASK_DIR_OR_GLUE_NAME [--set k=v ...]")
        config = plan_finetune(args.run, args.task, args.overrides, args.glue_root, args.checkpoint)
        run_dir = Path(args.out or Path("runs") / f"{config.name}-{config.finetune.init}-"
                                                   f"{time.strftime('%Y%m%d-%H%M%S')}")
    result = finetune(config, run_dir, resume=bool(args.resume))
    if result.interrupted_by is not None:
        if _is_main_process():
            print(f"stopped at step {result.step}; checkpoint written. Continue with:\n"
                  f"  {_launcher()} finetune --resume {run_dir}")
        return 128 + result.interrupted_by
    if not _is_main_process():
        return 0
    plot_run(run_dir)
    if config.task.kind == "generation" and config.finetune.generate_tokens > 0:
        write_samples(run_dir, resolve_device(config.finetune.device))
    shown = ", ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in result.best.items())
    early = " (stopped early)" if result.stopped_early else ""
    print(f"best dev: {shown}  (step {result.best_step} of {result.total_steps}{early}, {result.seconds:.0f}s)")
    print(f"run directory: {run_dir}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from lmforge.tasks.finetune import is_finetune_run, load_finetuned, predict
    from lmforge.train.device import resolve_device

    if not is_finetune_run(args.run):
        raise LmforgeError(f"predict needs a fine-tuned run (lmforge finetune); {args.run} is not one")
    if (args.text is None) == (args.file is None):
        raise LmforgeError('give a text (and optionally its pair) or --file, e.g. lmforge predict RUN "great film"')
    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise LmforgeError(f"--file {path}: no such file")
        lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        inputs = [tuple(line.split("\t", 1)) if "\t" in line else (line, None) for line in lines]
    else:
        inputs = [(args.text, args.pair)]
    run = load_finetuned(args.run, args.checkpoint, resolve_device(args.device))
    results = predict(run, inputs, args.task)
    for (text, pair), result in zip(inputs, results):
        if args.json:
            print(json.dumps({"text": text, **({"pair": pair} if pair is not None else {}), **result}))
        elif "label" in result:
            probs = "  ".join(f"{name}: {p:.3f}" for name, p in result["probabilities"].items())
            print(f"{result['label']}\t{result['probabilities'][result['label']]:.3f}\t({probs})\t{text}")
        elif "score" in result:
            print(f"{result['score']:.4f}\t{text}")
        elif "entities" in result:
            found = "  ".join(f"{e['type']}: {e['text']}" for e in result["entities"]) or "(no entities)"
            print(f"{found}\t{text}")
        elif "answer" in result:
            print(result["answer"])
        elif "output" in result:
            print(result["output"])
        else:
            print(result["response"])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lmforge.interop.hf_export import export_run

    result = export_run(Path(args.run), Path(args.out), args.checkpoint)
    print(f"exported {args.run} ({result.checkpoint}) as {result.architecture} -> {result.out}: "
          f"{', '.join(result.files)}")
    print(f'load with: transformers.{result.auto_class}.from_pretrained("{result.out}") and '
          f'AutoTokenizer.from_pretrained("{result.out}")')
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from lmforge.interop.hf_import import describe, import_hf

    print(describe(import_hf(Path(args.hf_dir), Path(args.out), args.config, args.overrides, args.task)))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from lmforge.tasks.experiment import load_experiment, run_experiment

    overrides = list(args.overrides)
    # `--seeds ""` is an empty list (refused by validation), not "use the recipe's seeds".
    for key in ("tasks", "fractions", "seeds"):
        text = getattr(args, key)
        if text is None:
            continue
        items = [item.strip() for item in text.split(",")] if text.strip() else []
        for i, item in enumerate(items):
            if not item:
                raise LmforgeError(f"--{key}: item {i + 1} of {text!r} is empty (give a comma-separated list)")
        # as a list of strings: the recipe's typed keys read "1e-1" as 0.1 and "2" as 2, and refuse the rest
        overrides.append(f"{key}={json.dumps(items)}")
    config = load_experiment(args.config, overrides)
    out = Path(args.out or Path("runs") / f"{config.name}-{Path(args.run).name}")
    rows = run_experiment(args.run, config, out, args.glue_root)
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"{len({r['run'] for r in rows})} fine-tuned runs, table and plot in {out} (results.md, results.png)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lmforge.report import plot_run, plot_store, summarize, summarize_store

    run_dir = Path(args.run)
    if (run_dir / "manifest.json").is_file():  # a token store
        written = plot_store(run_dir)
        print(summarize_store(run_dir))
    elif not (run_dir / "metrics.jsonl").is_file():
        raise LmforgeError(f"{run_dir} has no metrics.jsonl (a run) or manifest.json (a token store)")
    else:
        written = plot_run(run_dir)
        print(summarize(run_dir))
    for path in written:
        print(f"plot: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Pretrain and fine-tune Transformer language models.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("prepare", help="corpus -> tokenizer -> token store")
    _add_config_args(p)
    p.add_argument("--out", help="store directory (default: data.store, or a cache directory)")
    p.add_argument("--workers", type=int, help="tokenizer and curation processes (default: data.workers; "
                   "0 = one per core); the store is the same for any number")
    p.add_argument("--executor", choices=["local", "slurm", "ray"], help="tokenize as datatrove tasks on this "
                   "executor (default: data.executor, else this process's pool); the store is the same")
    p.add_argument("--tasks", type=int, help="datatrove tasks, each a share of the corpus files (default: data.tasks; "
                   "0 = one per file)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("verify", help="check every checksum of a token store, or of a run's checkpoints and store")
    p.add_argument("path", help="token store directory or run directory")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("pretrain", help="pretrain a model (no arguments: the built-in default)")
    _add_config_args(p)
    p.add_argument("--out", help="run directory (default: runs/NAME-TIMESTAMP)")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its newest complete checkpoint")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("evaluate", help="validation metrics of a run's checkpoint (loss, perplexity / MLM, NSP)")
    _add_run_args(p)
    p.add_argument("--split", default="val")
    p.add_argument("--batches", type=int, help="batches to evaluate (default: train.eval_batches)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--text", nargs="+", metavar="FILE", help="score these files (txt / jsonl / parquet, globs) "
                   "instead of the validation split: loss, perplexity or masked accuracy, bits per byte")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("generate", help="sample text from a decoder run; fill the <extra_id_N> spans of a t5 prompt")
    _add_run_args(p)
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of tokens with "
                   "probability >= p, in (0, 1] (1 = all)")
    p.add_argument("--seed", type=int, default=0, help="in [0, 2**63)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--beams", type=int, default=1, help="beam search of this width (1 = greedy / sampling)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beams: finished hypotheses score sum log p / generated length ** this")
    p.add_argument("--early-stopping", action="store_true",
                   help="beams: stop once --beams hypotheses are finished")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("fill-mask", help="top-k predictions for each [MASK] in a text (bert runs)")
    _add_run_args(p)
    p.add_argument("text", help='e.g. "The capital of France is [MASK]."')
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_fill_mask)

    p = sub.add_parser("finetune", help="fine-tune a run on a labeled task (classification, regression, generation)")
    p.add_argument("run", nargs="?", help="the run to start from: a pretraining run, or a fine-tuned one")
    p.add_argument("--task", help="task directory, task recipe, or a GLUE name (cola, sst2, mrpc, stsb, wnli); "
                   "a,b: several tasks in one text-to-text fine-tune of a t5 run")
    p.add_argument("--glue-root", help="where GLUE task names are looked up (default: ../shared/data/glue)")
    p.add_argument("--checkpoint", help="checkpoint of RUN to start from (default: newest; a fine-tuned run's best)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set finetune.lr=2e-4, --set finetune.init=random, --set task.text_pair=q2 (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/TASK-INIT-TIMESTAMP)")
    p.add_argument("--resume", metavar="FT_RUN", help="continue an interrupted fine-tune from its newest checkpoint")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("predict", help="labels with probabilities (or scores, or responses) from a fine-tuned run")
    _add_run_args(p)
    p.add_argument("text", nargs="?", help="the input text")
    p.add_argument("pair", nargs="?", help="the second text, for pair tasks")
    p.add_argument("--file", help="one input per line; a tab separates the two texts of a pair")
    p.add_argument("--json", action="store_true", help="one JSON object per input")
    p.add_argument("--task", help="a multi-task t5 run: the task the inputs are for (default: its first)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a run's checkpoint as a transformers model directory")
    p.add_argument("run", help="run directory")
    p.add_argument("--to", required=True, choices=["hf"], help="hf: Hugging Face transformers (GPT2LMHeadModel / "
                   "LlamaForCausalLM / Qwen3ForCausalLM / BertForPreTraining / T5ForConditionalGeneration; fine-tuned BERT: "
                   "BertForSequenceClassification / BertForTokenClassification / BertForQuestionAnswering; "
                   "tokenizer files)")
    p.add_argument("out", help="output directory (new or empty)")
    p.add_argument("--checkpoint", help="checkpoint name, e.g. step-000500 (default: newest complete)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="turn a local transformers checkpoint (GPT-2, Llama, Qwen3, BERT, T5, BERT task "
                       "models) into a run")
    p.add_argument("hf_dir", help="directory with config.json, weights (safetensors or .bin) and tokenizer files")
    p.add_argument("out", help="run directory to create")
    _add_config_args(p)
    p.add_argument("--task", help="for a BERT task model (sequence / token classification, question answering): "
                   "the task directory or recipe it was trained for, which evaluate reads")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("experiment", help="does pretraining pay? fine-tune from a pretrained run and from random "
                       "init at several label budgets: table + plot")
    p.add_argument("run", help="the pretraining run")
    p.add_argument("--config", "-c", default="finetune-pretrain-value",
                   help="experiment recipe: tasks, fractions, finetune settings (default: finetune-pretrain-value)")
    p.add_argument("--tasks", help="comma-separated task directories or GLUE names, e.g. sst2,mrpc")
    p.add_argument("--fractions", help="comma-separated label budgets, e.g. 0.1,0.3,1.0")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set finetune.steps=100 (repeatable)")
    p.add_argument("--glue-root", help="where GLUE task names are looked up (default: ../shared/data/glue)")
    p.add_argument("--seeds", help="comma-separated seeds, each cell once per seed, e.g. 1,2,3")
    p.add_argument("--out", help="experiment directory (default: runs/NAME-RUN); re-running continues it")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("report", help="plots and a summary of a run, or of a token store (curation)")
    p.add_argument("run", help="run directory or token store directory")
    p.set_defaults(func=cmd_report)
    return parser


def _is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or the only process (from torchrun's environment, which outlives the
    process group)."""
    from lmforge.train.distributed import world_from_env

    try:
        return world_from_env().is_main
    except LmforgeError:  # a malformed environment was already reported as this verb's error
        return True


def _launcher() -> str:
    """How to run lmforge again the way this process was started (torchrun's resume command keeps the processes)."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world == "1":
        return "lmforge"
    return f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world)} -m lmforge"


class _ToStderr(logging.Handler):
    """The library's log lines, as plain lines on stderr, between progress bars (not through them)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _show_library_log() -> None:
    logger = logging.getLogger("lmforge")
    if not any(isinstance(h, _ToStderr) for h in logger.handlers):
        logger.addHandler(_ToStderr())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    args.started = started  # the commands that report where their time went count from here
    _show_library_log()
    try:
        return args.func(args)
    except LmforgeError as exc:
        from lmforge.train.distributed import started

        # Before the processes of a torchrun launch meet, they all stop on the same input: rank 0 says
        # why. Afterwards an error may be one process's own, and each says it with its rank.
        if started():
            print(f"lmforge {args.verb} [rank {os.environ.get('RANK', '0')}]: error: {exc}", file=sys.stderr)
        elif _is_main_process():
            print(f"lmforge {args.verb}: error: {exc}", file=sys.stderr)
        elif os.environ.get("TORCHELASTIC_RUN_ID"):
            # Under torchrun the first process to exit makes it stop the others: wait, so that rank 0
            # (failing on the same input) says why before it is stopped. Still running afterwards, the
            # error was this process's own: say it.
            time.sleep(PEER_ERROR_GRACE_S)
            print(f"lmforge {args.verb} [rank {os.environ.get('RANK', '0')}]: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.verb}: interrupted", file=sys.stderr)
        return 130
