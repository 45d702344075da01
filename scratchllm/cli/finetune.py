"""`scratchllm finetune classify|instruct|dpo`, `scratchllm classify` and `scratchllm merge`."""

import argparse
import json
import sys
from pathlib import Path

from scratchllm.cli.common import command_group
from scratchllm.errors import UserError
from scratchllm.fileio import json_line, read_json_object, read_utf8

CLASSIFY_NEXT = """next:
  scratchllm classify --checkpoint {run} "Congratulations, you won a prize! Call now"
  scratchllm plot {run}"""


def register_finetune(commands) -> None:
    """Add `scratchllm finetune classify|instruct|dpo`."""
    sub = command_group(commands, "finetune", "fine-tune a pretrained model for a task")
    p = _recipe_parser(
        sub, "classify", "turn a pretrained GPT into a text classifier",
        "Replace the LM head by a classification head and fine-tune it (and the last N blocks, "
        "everything, or LoRA adapters) on labelled texts.", "classify",
        "the base: a checkpoint or run directory", cmd_finetune_classify)
    p.add_argument("--data", help="sms-spam (default) or a .csv/.tsv/.jsonl/.json file")
    p.add_argument("--text-field", help="field holding the text (default: text)")
    p.add_argument("--label-field", help="field holding the label (default: label)")

    p = _recipe_parser(
        sub, "instruct", "instruction-tune a pretrained GPT into an assistant",
        "Fine-tune on prompt-response pairs (Alpaca records or {\"messages\": [...]} "
        "conversations), learning only the responses.", "instruct",
        "the base: a checkpoint or run directory", cmd_finetune_instruct)
    p.add_argument("--data", help="instruction-data (default), another dataset name (e.g. "
                                  "gsm8k), a .json/.jsonl file, or hf:NAME[:CONFIG][@SPLIT]")
    p.add_argument("--fields", metavar="OURS=THEIRS,...",
                   help="take instruction/input/output (or messages) from the data's own "
                        "fields, e.g. instruction=question,output=answer")
    p.add_argument("--template", help="alpaca (default) or chat (role tokens, multi-turn)")

    p = _recipe_parser(
        sub, "dpo", "preference-tune an instruction-tuned model (DPO)",
        "Direct preference optimisation on chosen/rejected pairs; the starting model is also "
        "the reference (its log-probs are computed once).", "dpo",
        "the instruction-tuned run to tune", cmd_finetune_dpo)
    p.add_argument("--data", help="preference-data (default) or a .json file")


def _recipe_parser(sub, name: str, help_text: str, description: str, section: str,
                   checkpoint_help: str, handler) -> argparse.ArgumentParser:
    """A fine-tuning command: --checkpoint, --out, --config, --resume and overrides."""
    p = sub.add_parser(name, help=help_text, description=(
        f"{description} Every config key can be overridden as --section.key=value (sections: "
        f"{section}, lora, train, optim, eval, checkpoint), e.g. --{section}.epochs=3 "
        "--lora.rank=8 --optim.lr=1e-4."))
    p.add_argument("--checkpoint", required=True, help=checkpoint_help)
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--config", type=Path, help="TOML config")
    p.add_argument("--resume", nargs="?", const="auto", metavar="auto|DIR",
                   help="continue the run in --out (auto) or from a checkpoint directory")
    p.set_defaults(handler=handler, accepts_overrides=True)
    return p


def register_classify(commands) -> None:
    """Add `scratchllm classify`."""
    p = commands.add_parser(
        "classify", help="label texts with a fine-tuned classifier",
        description="Print the predicted label and its probability for each text (arguments, "
                    "--file with one text per line, or JSONL records with a 'text' field).")
    p.add_argument("--checkpoint", required=True, type=Path, help="classifier run or checkpoint")
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--file", type=Path, help="one text per line, or .jsonl with a text field")
    p.add_argument("--text-field", default="text", help="JSONL field of the text")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps (default: auto)")
    p.add_argument("--json", action="store_true", help="one JSON object per text")
    p.set_defaults(handler=cmd_classify)


def register_merge(commands) -> None:
    """Add `scratchllm merge`."""
    p = commands.add_parser(
        "merge", help="fold a LoRA run's adapters into a plain checkpoint",
        description="Write a plain checkpoint with the LoRA adapters merged into the weights "
                    "(no base model needed to load it): a classifier, or an instruction-tuned "
                    "model with its template.")
    p.add_argument("--checkpoint", required=True, type=Path, help="LoRA run or checkpoint")
    p.add_argument("--out", required=True, type=Path, help="directory to write")
    p.set_defaults(handler=cmd_merge)


def _run_recipe(args: argparse.Namespace, schema, make_trainer, section: str,
                flags: tuple[str, ...]):
    """Load the recipe's config (CLI flags become [section] keys), train; (loop, result)."""
    from scratchllm.config import load_config

    overrides = list(args.overrides) + [f"--{section}.checkpoint={args.checkpoint}"]
    for flag in flags:
        if getattr(args, flag) is not None:
            overrides.append(f"--{section}.{flag}={getattr(args, flag)}")
    config = load_config(args.config, overrides, schema)
    loop = make_trainer(config, args.out, resume=args.resume, progress=sys.stderr.isatty(),
                        log=lambda message: print(message, file=sys.stderr))
    result = loop.run()
    if not result.is_main:  # under torchrun rank 0 reports
        raise SystemExit(0)
    if result.interrupted:
        print(f"stopped at step {result.step}; resume with --resume", file=sys.stderr)
    return loop, result


def cmd_finetune_classify(args: argparse.Namespace) -> int:
    from scratchllm.finetune.classify import ClassifyConfig, classifier_trainer

    loop, result = _run_recipe(args, ClassifyConfig, classifier_trainer, "classify",
                               ("data", "text_field", "label_field"))
    confusion = result.last_eval.get("test_confusion")
    if confusion:
        labels = loop.recipe.config.labels
        width = max(len(label) for label in labels) + 2
        print("test confusion matrix (rows: true label, columns: predicted):")
        print(" " * width + "".join(f"{label:>{width}}" for label in labels))
        for label, row in zip(labels, confusion, strict=True):
            print(f"{label:>{width}}" + "".join(f"{n:>{width}}" for n in row))
        print(f"test accuracy {result.last_eval['test_acc']:.2%}, "
              f"macro-F1 {result.last_eval['test_f1']:.3f}")
    if result.interrupted:
        return 130
    print(CLASSIFY_NEXT.format(run=args.out))
    return 0


def cmd_finetune_instruct(args: argparse.Namespace) -> int:
    from scratchllm.finetune.instruct import InstructConfig, instruct_trainer

    _, result = _run_recipe(args, InstructConfig, instruct_trainer, "instruct",
                            ("data", "fields", "template"))
    if result.interrupted:
        return 130
    print(f"next:\n  scratchllm chat --checkpoint {args.out}\n  scratchllm plot {args.out}")
    return 0


def cmd_finetune_dpo(args: argparse.Namespace) -> int:
    from scratchllm.finetune.preference import DPOConfig, dpo_trainer

    _, result = _run_recipe(args, DPOConfig, dpo_trainer, "dpo", ("data",))
    if result.interrupted:
        return 130
    print(f"next:\n  scratchllm chat --checkpoint {args.out}")
    return 0


def cmd_classify(args: argparse.Namespace) -> None:
    from scratchllm.finetune.classify import classify_texts, load_classifier
    from scratchllm.runtime import resolve_device

    texts = list(args.texts)
    if args.file is not None:
        texts += _read_texts(args.file, args.text_field)
    if not texts:
        raise UserError("no texts to classify: give them as arguments or with --file")
    model, tokenizer, config = load_classifier(args.checkpoint, resolve_device(args.device))
    for text, result in zip(texts, classify_texts(model, tokenizer, config, texts), strict=True):
        if args.json:
            print(json.dumps({"text": text, **result}, ensure_ascii=False))
        else:
            print(f"{result['label']}\t{result['probability']:.3f}\t{text}")


def _read_texts(path: Path, field: str) -> list[str]:
    text = read_utf8(path, "give --file a UTF-8 text file (one text per line) or JSONL")
    lines = [line for line in text.splitlines() if line.strip()]
    if path.suffix.lower() != ".jsonl":
        return lines
    texts = []
    for n, line in enumerate(lines, 1):
        record = json_line(line, f"{path}:{n}")
        if not isinstance(record, dict) or field not in record:
            raise UserError(f"{path}:{n} has no field {field!r}; name it with --text-field")
        texts.append(str(record[field]))
    return texts


def cmd_merge(args: argparse.Namespace) -> None:
    from scratchllm.checkpoint import find_checkpoint
    from scratchllm.finetune.classify import merge_checkpoint
    from scratchllm.finetune.instruct import ADAPTER_FILE, merge_chat_checkpoint

    checkpoint = find_checkpoint(args.checkpoint)
    if (checkpoint / ADAPTER_FILE).is_file():  # an instruct or DPO run's adapters
        merge = merge_chat_checkpoint
    elif read_json_object(checkpoint / "config.json", "re-save the checkpoint").get("kind") \
            == "classifier":
        merge = merge_checkpoint
    else:
        raise UserError(f"{checkpoint} has no LoRA adapters: merge takes a LoRA fine-tuning "
                        "run (scratchllm finetune classify|instruct|dpo --lora.rank=R)")
    print(f"wrote {merge(args.checkpoint, args.out)}")
