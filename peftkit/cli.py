"""The ``peftkit`` command: train, eval, predict, merge, info.

    peftkit train [CONFIG.yaml] [--key value ...] [--resume]
    peftkit eval --run DIR --data FILE
    peftkit predict --run DIR (--data FILE [--out FILE] | --text "..." [--text_pair "..."])
    peftkit merge --run DIR --out DIR
    peftkit info DIR
    peftkit serve --base PATH --adapters DIR [--host 127.0.0.1 --port 8000]

Exit status: 0 done; 2 bad input (a config key, a data file, a run folder, an output that cannot be written),
reported in one paragraph naming what is wrong; 3 training diverged (non-finite loss, gradients or weights; nothing
from the diverged model is saved); 1 an internal error (a bug: PEFTKIT_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERNAL = 1


class UsageError(ValueError):
    """Command-line arguments that do not fit together."""


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .data import DataError
    from .io import AdapterFileError
    from .targets import TargetError

    # OSError: FileExistsError, FileNotFoundError, and outputs that cannot be written (io.OutputError)
    return DataError, ConfigError, AdapterFileError, TargetError, UsageError, OSError


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv:
        parser.print_help()
        return EXIT_BAD_INPUT
    if argv[0] == "train" and any(a in ("-h", "--help") for a in argv[1:]):
        from .train.config import describe

        print(_TRAIN_HELP + describe())
        return 0
    try:
        if argv[0] == "train":  # a free-form list of --key value overrides: parsed by the config loader
            rest = argv[1:]
            config = rest.pop(0) if rest and not rest[0].startswith("--") else None
            resume = "--resume" in rest
            rest = [a for a in rest if a != "--resume"]
            return _train(argparse.Namespace(config=config, resume=resume), rest)
        args = parser.parse_args(argv)
        return args.handler(args, [])
    except _bad_input_errors() as err:
        print(f"error: {_message(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:
        from .train.guards import TrainingDiverged

        if isinstance(err, TrainingDiverged):
            print(f"error: {err}", file=sys.stderr)
            return EXIT_DIVERGED
        if os.environ.get("PEFTKIT_DEBUG"):
            raise
        print(f"error: internal error, a bug in peftkit ({type(err).__name__}: {err}). Run again with PEFTKIT_DEBUG=1 "
              "to see the traceback, and please report it.", file=sys.stderr)
        return EXIT_INTERNAL


def _message(err: BaseException) -> str:
    from .io import OutputError

    if isinstance(err, OSError) and not isinstance(err, OutputError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return str(err)


_TRAIN_HELP = """usage: peftkit train [CONFIG.yaml] [--resume] [--key value ...]

Fine-tune a text classifier (single texts or sentence pairs). Without CONFIG the embedded default runs: LoRA on
the packaged all-MiniLM-L6-v2 over the built-in customer-service intents. Every key below can be set in the YAML
file or overridden on the command line (--learning_rate 3e-4, --method lora, --lora.r 16). Under
`torchrun --nproc_per_node N` the same command trains with DDP (or FSDP2 with --distributed fsdp).

keys:
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune (see peftkit train --help for every config key)", add_help=False)
    train.add_argument("config", nargs="?", help="YAML config file")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint of output_dir")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="evaluate a run on a labelled file")
    evaluate.add_argument("--run", required=True, help="a run folder, or a folder written by peftkit merge")
    evaluate.add_argument("--data", required=True)
    _column_arguments(evaluate)
    evaluate.set_defaults(handler=_eval)

    predict = commands.add_parser("predict", help="labels and probabilities for texts")
    predict.add_argument("--run", required=True, help="a run folder, or a folder written by peftkit merge")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a .csv/.tsv/.jsonl file (labels not needed)")
    source.add_argument("--text", action="append", help="a text (repeat for several)")
    predict.add_argument("--text_pair", action="append", help="second text of a pair (with --text)")
    predict.add_argument("--out", help="write predictions here (.csv or .jsonl) instead of printing")
    _column_arguments(predict)
    predict.set_defaults(handler=_predict)

    merge = commands.add_parser("merge", help="write the run as a transformers model folder (its README.md says what is in it)")
    merge.add_argument("--run", required=True)
    merge.add_argument("--out", required=True)
    merge.set_defaults(handler=_merge)

    serve = commands.add_parser("serve", help="serve many adapters from one base model over HTTP")
    serve.add_argument("--base", required=True, help="the base model folder (a merged folder too), or 'minilm'")
    serve.add_argument("--adapters", required=True, help="directory whose sub-folders are runs or adapter folders")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--pooling", default="auto", choices=["auto", "pooler", "cls", "mean"])
    serve.add_argument("--max_batch_size", type=int, default=32, help="rows per forward pass")
    serve.add_argument("--max_wait_ms", type=float, default=5.0, help="how long a request may wait for others")
    serve.add_argument("--max_length", type=int, default=128)
    serve.add_argument("--threads", type=int, default=None)
    serve.add_argument("--max_request_bytes", type=int, default=4 * 1024 * 1024,
                       help="largest request body accepted (larger: HTTP 413)")
    serve.set_defaults(handler=_serve)

    info = commands.add_parser("info", help="what a run folder holds")
    info.add_argument("run")
    info.set_defaults(handler=_info)
    return parser


def _column_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text_column", help="default: the run's text_column")
    parser.add_argument("--text_pair_column", help="default: the run's text_pair_column")
    parser.add_argument("--label_column", help="default: the run's label_column")


def _columns(args, run):
    from .data import Columns

    config = run.config
    return Columns(args.text_column or config.text_column, args.label_column or config.label_column,
                   args.text_pair_column or config.text_pair_column)


# --------------------------------------------------------------------------------------------- commands
def _train(args, rest) -> int:
    from .train.config import load
    from .train.trainer import train

    config_file, embedded = args.config, False
    if config_file is None and not any(a.split("=")[0] == "--train_file" for a in rest):
        from .demo import DATA_DIR

        config_file, embedded = DATA_DIR / "demo.yaml", True  # the embedded default: the demo intents
    config = load(config_file, rest, embedded=embedded)
    train(config, resume=args.resume)
    return 0


def _eval(args, rest) -> int:
    from .train.run import Run

    run = Run(args.run)
    result = run.evaluate(args.data, _columns(args, run))
    print(result["report_text"])
    print(f"accuracy {result['accuracy']:.4f}   macro-F1 {result['macro_f1']:.4f}   loss {result['loss']:.4f}")
    return 0


def _predict(args, rest) -> int:
    from .train.run import Run

    if args.text_pair and (not args.text or len(args.text_pair) != len(args.text)):
        raise UsageError(f"{len(args.text or [])} --text but {len(args.text_pair)} --text_pair: give one --text_pair "
                         "per --text (in the same order), or none")
    run = Run(args.run)
    if args.text:
        texts, pairs = args.text, args.text_pair
    else:
        examples = run.read(args.data, labelled=False, columns=_columns(args, run))
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples] if examples[0].text_pair is not None else None
    probs = run.probabilities(texts, pairs)
    rows = []
    for i, text in enumerate(texts):
        best = int(probs[i].argmax())
        rows.append({"text": text, **({"text_pair": pairs[i]} if pairs else {}), "label": run.labels.names[best],
                     "probability": round(float(probs[i, best]), 6),
                     "probabilities": {name: round(float(p), 6) for name, p in zip(run.labels.names, probs[i])}})
    if args.out:
        _write_predictions(Path(args.out), rows, run.labels.names)
        print(f"{len(rows)} predictions written to {args.out}")
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    return 0


def _write_predictions(path: Path, rows: list[dict], names: list[str]) -> None:
    from .io import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            if path.suffix.lower() == ".jsonl":
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                return
            fields = [k for k in ("text", "text_pair") if k in rows[0]] + ["label", "probability"] + [f"p_{n}" for n in names]
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            for row in rows:
                flat = {k: row[k] for k in fields if k in row}
                flat.update({f"p_{n}": row["probabilities"][n] for n in names})
                writer.writerow(flat)

    atomic_write(path, write)


def _merge(args, rest) -> int:
    from .train.run import Run

    out = Run(args.run).merge(args.out)
    print(f"merged model written to {out}")
    return 0


def _serve(args, rest) -> int:
    from .serve.app import serve
    from .serve.model import BadAdapterRequest

    try:
        serve(args.base, args.adapters, args.host, args.port, args.pooling, args.max_batch_size, args.max_wait_ms,
              args.max_length, args.threads, args.max_request_bytes)
    except BadAdapterRequest as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _info(args, rest) -> int:
    from .train.run import Run

    for key, value in Run(args.run).info().items():
        if key == "labels":
            value = f"{len(value)}: " + ", ".join(value[:20]) + (" ..." if len(value) > 20 else "")
        print(f"{key:>15}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
