"""The ``peftkit`` command: train, eval, predict, merge, info.

    peftkit train [CONFIG.yaml] [--key value ...] [--resume]
    peftkit eval --run DIR --data FILE
    peftkit predict --run DIR (--data FILE [--out FILE] | --text "..." [--text_pair "..."])
    peftkit merge --run DIR --out DIR
    peftkit generate --run DIR (--prompt "..." | --data FILE [--out FILE]) [--temperature T --top_p P ...]
    peftkit chat --run DIR
    peftkit rank --run DIR --query "..." --candidates FILE [--top K]
    peftkit info DIR
    peftkit search [CONFIG.yaml] --space SPACE.yaml --trials N [--jobs J ...] [--key value ...]
    peftkit serve --base PATH --adapters DIR [--host 127.0.0.1 --port 8000]
    peftkit monitor --run DIR --input FILE|- --rule RULE ... [--group-by FIELD --alerts FILE --webhook URL --state DIR]

Exit status: 0 done; 2 bad input (a config key, a data file, a run folder, an output that cannot be written),
reported in one paragraph naming what is wrong; 3 training diverged (non-finite loss, gradients or weights; nothing
from the diverged model is saved); 1 an internal error (a bug: PEFTKIT_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
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
    from .io import AdapterFileError
    from .targets import TargetError
    from .tasks.data import DataError

    # OSError: FileExistsError, FileNotFoundError, and outputs that cannot be written (atomic.OutputError)
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
        if argv[0] == "search":  # its own options, then --key value overrides of the config (as for train)
            from .search.command import run as search

            return search(argv[1:])
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
    from .atomic import OutputError

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

    predict = commands.add_parser("predict", help="predictions for texts (classification: labels and probabilities)")
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

    generate = commands.add_parser("generate", help="causal-lm: answers to prompts (greedy unless --temperature > 0)")
    generate.add_argument("--run", required=True, help="a causal-lm run folder, or a folder written by peftkit merge")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a user message (repeat for several)")
    source.add_argument("--data", help="a .jsonl/.csv/.tsv file of prompts (messages, prompt or instruction)")
    generate.add_argument("--out", help="write the answers here (.jsonl or .csv) instead of printing")
    _sampling_arguments(generate)
    generate.set_defaults(handler=_generate)

    chat = commands.add_parser("chat", help="causal-lm: an interactive conversation (answers streamed)")
    chat.add_argument("--run", required=True, help="a causal-lm run folder, or a folder written by peftkit merge")
    _sampling_arguments(chat)
    chat.set_defaults(handler=_chat)

    rank = commands.add_parser("rank", help="ranking: a query's candidates ranked by a ranking run (JSON lines)")
    rank.add_argument("--run", required=True, help="a ranking run folder, or a folder written by peftkit merge")
    rank.add_argument("--query", required=True, help="the query (e.g. a user's profile text)")
    rank.add_argument("--candidates", required=True, help="items: a .txt file (one per line) or .jsonl/.csv rows")
    rank.add_argument("--top", type=int, default=10, help="how many of the best items to print (default 10)")
    rank.add_argument("--item_column", default=None, help="column of the item text in .jsonl/.csv (default: the run's)")
    rank.set_defaults(handler=_rank)

    serve = commands.add_parser("serve", help="serve many adapters from one base model over HTTP")
    serve.add_argument("--base", required=True, help="the base model folder (a merged folder too), or 'minilm'")
    serve.add_argument("--adapters", required=True, help="directory whose sub-folders are runs or adapter folders")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--task", default="classification", help="the task of the base model and its adapters; 'auto': classification and token-classification "
                       "run folders on one encoder (POST /v1/classify and /v1/tag share each forward of the body)")
    serve.add_argument("--pooling", default=None, choices=["auto", "pooler", "cls", "mean"],
                       help="classification: the features the head sees (default auto)")
    serve.add_argument("--max_batch_size", type=int, default=32, help="rows per forward pass")
    serve.add_argument("--max_wait_ms", type=float, default=None,
                       help="classification/tagging: how long a request may wait for others (default 5); causal-lm "
                            "needs none (requests join the running batch between decode steps)")
    serve.add_argument("--max_length", type=int, default=None,
                       help="classification: tokens per text (default 128); causal-lm: refused, see --context_length")
    serve.add_argument("--context_length", type=int, default=None,
                       help="causal-lm: tokens of prompt and answer together (default and maximum: the model's own)")
    serve.add_argument("--default_max_tokens", type=int, default=None,
                       help="causal-lm: answer length when a request sends no max_tokens (default 256; any answer "
                            "is capped by the context)")
    serve.add_argument("--threads", type=int, default=None)
    serve.add_argument("--max_request_bytes", type=int, default=4 * 1024 * 1024,
                       help="largest request body accepted (larger: HTTP 413)")
    serve.set_defaults(handler=_serve)

    from .monitor.command import HELP as MONITOR_HELP, add_arguments as monitor_arguments

    monitor = commands.add_parser("monitor", help="classify a stream of JSON lines and raise alerts on rules",
                                  description=MONITOR_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    monitor_arguments(monitor)
    monitor.set_defaults(handler=_monitor)

    from .ui.command import HELP as UI_HELP, add_arguments as ui_arguments

    ui = commands.add_parser("ui", help="a web page for runs, searches and served adapters", description=UI_HELP)
    ui_arguments(ui)
    ui.set_defaults(handler=_ui)

    commands.add_parser("search", help="hyper-parameter search with Optuna (see peftkit search --help)", add_help=False)

    info = commands.add_parser("info", help="what a run folder holds")
    info.add_argument("run")
    info.set_defaults(handler=_info)
    return parser


def _sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default); above 0: sampling")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeat for several)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling")


def _sampling(args):
    from .tasks.causal_lm_generate import Sampling

    return Sampling(args.max_new_tokens, args.temperature, args.top_p, tuple(args.stop), args.seed)


def _column_keys() -> list[str]:
    """The per-file column settings of every task (``--text_column`` ...): each overrides the run's own."""
    from .tasks import available_tasks, get_task

    return list(dict.fromkeys(key for name in available_tasks() for key in get_task(name).column_keys))


def _column_arguments(parser: argparse.ArgumentParser) -> None:
    for key in _column_keys():
        parser.add_argument(f"--{key}", help=f"default: the run's {key}")


def _open(args):
    """The run of ``--run``, reading files with the columns given on the command line."""
    from .train.run import Run

    return Run(args.run).with_columns(**{key: getattr(args, key, None) for key in _column_keys()})


# --------------------------------------------------------------------------------------------- commands
def _train(args, rest) -> int:
    from .train.config import load
    from .train.trainer import train

    config_file, embedded = args.config, False
    if config_file is None and not any(a.split("=")[0] == "--train_file" for a in rest):
        from .tasks.demo import DATA_DIR

        config_file, embedded = DATA_DIR / "demo.yaml", True  # the embedded default: the demo intents
    config = load(config_file, rest, embedded=embedded)
    train(config, resume=args.resume)
    return 0


def _eval(args, rest) -> int:
    run = _open(args)
    result = run.evaluate(args.data)
    print(result["report_text"])
    print(f"{run.task.summary(result)}   loss {result['loss']:.4f}")
    return 0


def _predict(args, rest) -> int:
    if args.text_pair and (not args.text or len(args.text_pair) != len(args.text)):
        raise UsageError(f"{len(args.text or [])} --text but {len(args.text_pair)} --text_pair: give one --text_pair "
                         "per --text (in the same order), or none")
    run = _open(args)
    examples = run.task.inputs(args.text, args.text_pair) if args.text else run.read_file(args.data, labelled=False)
    rows = run.predict(examples)
    if args.out:
        run.write_predictions(Path(args.out), rows)
        print(f"{len(rows)} predictions written to {args.out}")
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    return 0


def _merge(args, rest) -> int:
    from .train.run import Run

    out = Run(args.run).merge(args.out)
    print(f"merged model written to {out}")
    return 0


def _generate(args, rest) -> int:
    from .train import generate as G

    sampling = _sampling(args)
    run = G.open_causal(args.run)
    prompts = [G.prompt_messages(run, p) for p in args.prompt] if args.prompt else G.prompts_of_file(run, args.data)
    rows = G.generate_rows(run, prompts, sampling)
    if args.out:
        G.write_rows(Path(args.out), rows)
        print(f"{len(rows)} answers written to {args.out}")
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False) if args.data or len(rows) > 1 else row["completion"])
    return 0


def _chat(args, rest) -> int:
    from .train import generate as G

    sampling = _sampling(args)
    G.chat(G.open_causal(args.run), sampling)
    return 0


def _rank(args, rest) -> int:
    from .tasks.ranking import ranked
    from .tasks.ranking_data import read_candidates
    from .train.run import Run

    if args.top < 1:
        raise UsageError(f"--top must be at least 1 (got {args.top})")
    run = Run(args.run)
    if run.task.name != "ranking":
        raise UsageError(f"{args.run} is a {run.task.name} run; peftkit rank needs a run trained with task: ranking")
    candidates = read_candidates(args.candidates, args.item_column or run.config.item_column)
    group = run.task.candidates(args.query, [c["item"] for c in candidates])
    scores = run.logits([group])[0, :len(candidates)].tolist()
    for rank, (index, score) in enumerate(ranked(scores, args.top), start=1):
        print(json.dumps({"rank": rank, "score": round(score, 6), **candidates[index]}, ensure_ascii=False))
    return 0


def _serve(args, rest) -> int:
    from .serve.app import serve
    from .serve.model import BadAdapterRequest

    if args.context_length is not None and args.task != "causal-lm":
        raise UsageError(f"--context_length is for --task causal-lm; task {args.task} limits each text with --max_length")
    if args.task == "causal-lm" and args.max_length is not None:  # was silently ignored
        raise UsageError("--max_length limits each text of a classification server; for --task causal-lm the prompt "
                         "and the answer together are limited by --context_length")
    for flag, value in (("--pooling", args.pooling), ("--max_wait_ms", args.max_wait_ms)):
        if args.task == "causal-lm" and value is not None:  # were silently ignored
            raise UsageError(f"{flag} is for classification and tagging servers; a causal-lm server has no pooling and "
                             "no wait (requests join the running batch between decode steps): leave it out")
    if args.default_max_tokens is not None and (args.task != "causal-lm" or args.default_max_tokens < 1):
        raise UsageError("--default_max_tokens is for --task causal-lm and must be at least 1 "
                         f"(got {args.default_max_tokens} with task {args.task})")
    if args.context_length is not None and args.context_length < 2:
        raise UsageError(f"--context_length must be at least 2 tokens (got {args.context_length})")
    try:
        serve(args.base, args.adapters, args.host, args.port, {"pooling": args.pooling or "auto"}, args.max_batch_size,
              5.0 if args.max_wait_ms is None else args.max_wait_ms, 128 if args.max_length is None else args.max_length, args.threads, args.max_request_bytes, task=args.task,
              context_length=args.context_length, default_max_tokens=args.default_max_tokens or 256)
    except BadAdapterRequest as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _monitor(args, rest) -> int:
    from .monitor.command import run
    from .monitor.rules import RuleError
    from .monitor.stream import MonitorError

    try:
        return run(args)
    except (RuleError, MonitorError) as err:
        raise UsageError(str(err)) from None


def _ui(args, rest) -> int:
    from .ui.command import run

    try:
        return run(args)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _info(args, rest) -> int:
    from .train.run import Run

    for key, value in Run(args.run).info().items():
        if key == "labels":
            value = f"{len(value)}: " + ", ".join(value[:20]) + (" ..." if len(value) > 20 else "")
        print(f"{key:>15}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
