"""``spark-mnist``: thin subcommands that parse arguments and call the library.

Exit codes: 0 success, 2 bad input (one line on stderr naming the file and what is wrong), 1 anything else.
"""

import argparse
import json
import logging
import os
import sys
import traceback
import warnings
from typing import Sequence

import yaml

from spark_mnist import __version__, pipeline
from spark_mnist.config import SECTIONS, Settings, load_settings, options
from spark_mnist.errors import InputError, require_extra
from spark_mnist.paths import normalize_uri, redact
from spark_mnist.shards.commit import clean
from spark_mnist.tools import download, evaluate, plots, verify

__all__ = ["DEFAULT_CONFIG", "EXIT_BAD_INPUT", "build_parser", "settings_from_args", "run_command", "main"]

DEFAULT_CONFIG = os.path.join("conf", "local.yaml")
EXIT_BAD_INPUT = 2


class _RedactingFormatter(logging.Formatter):
    """Every line as ``spark-mnist: message``, with the credentials of any URI in it redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _configure_logging(verbose: bool) -> None:
    """Progress (INFO) to stdout, warnings and errors to stderr, for the ``spark_mnist`` loggers only; a URI's
    credentials never reach either (:func:`spark_mnist.paths.redact`)."""
    logger = logging.getLogger("spark_mnist")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(_RedactingFormatter("spark-mnist: %(message)s"))
    logger.handlers = [out, err]  # replacing those of an earlier main() in this process
    # Spark's JVM side is quieted by log4j2.properties (see session.spark_session); these are the Python loggers.
    for name, quiet in {"petastorm": logging.ERROR, "py4j": logging.ERROR, "TorchDistributor": logging.WARNING}.items():
        logging.getLogger(name).setLevel(logging.INFO if verbose else quiet)
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def build_parser() -> argparse.ArgumentParser:
    """The ``spark-mnist`` parser: every subcommand takes ``--verbose``; ``ingest``, ``train``, ``run`` and ``config``
    also ``--config`` and one option per setting of their sections (:func:`spark_mnist.config.options`), the tools
    their own."""
    parser = argparse.ArgumentParser(prog="spark-mnist", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"spark-mnist {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    ingest = commands.add_parser("ingest", help="gz IDX files -> Parquet shards + _manifest.json")
    train = commands.add_parser(
        "train", help="DDP training on an ingested dataset (--launcher torch-distributor, torchrun or ai-runtime)"
    )
    run = commands.add_parser("run", help="ingest + train with conf/local.yaml defaults")
    config = commands.add_parser("config", help="settings")
    config.add_argument("action", choices=["show"])
    verify = commands.add_parser("verify", help="check a directory of gz IDX files, without Spark")
    verify.add_argument("--source", required=True, help="directory, file:/, /dbfs/ or /Volumes/ path")
    verify.add_argument("--dataset", default="fashion-mnist", help="registry name (default: fashion-mnist)")
    verify.add_argument(
        "--allow-hash-mismatch",
        action="store_true",
        help="a subset or relabelled copy passes when its structure is right",
    )
    download = commands.add_parser("download", help="fetch a dataset's four gz IDX files, verified")
    download.add_argument("dataset", help="registry name: mnist, fashion-mnist, kmnist, emnist-<split>")
    download.add_argument("--to", required=True, help="target directory (local, /dbfs/, /Volumes/)")
    download.add_argument("--mirror", action="append", help="base URL to try instead of the registry's (repeatable)")
    download.add_argument("--retries", type=int, default=3, help="attempts per mirror")
    download.add_argument("--no-local", action="store_true", help="ignore copies already on this machine")
    preview = commands.add_parser("preview", help="PNG grid of sample images with class names, without Spark")
    preview.add_argument("--data", required=True, help="ingested dataset directory (OUT of ingest)")
    preview.add_argument("--out", required=True, help="PNG file to write, e.g. grid.png")
    preview.add_argument("--split", default="train", choices=["train", "test"], help="default: train")
    preview.add_argument("--seed", type=int, default=0, help="which random images (default: 0)")
    evaluate = commands.add_parser("evaluate", help="accuracy, per-class accuracy, confusion matrix; no Spark")
    evaluate.add_argument("--data", required=True, help="ingested dataset directory (OUT of ingest)")
    evaluate.add_argument("--model", required=True, help="model.pt written by train (or its checkpoint.pt)")
    evaluate.add_argument("--out-png", help="confusion-matrix PNG (default: confusion.png beside the model)")
    evaluate.add_argument("--batch-size", type=int, default=1000, help="images per forward pass (default: 1000)")
    evaluate.add_argument("--split", default="test", choices=["train", "test"], help="default: test")
    gc = commands.add_parser("gc", help="remove the generations no manifest names, older than --older-than, now")
    gc.add_argument("output", metavar="OUT", help="ingested dataset directory or URI (OUT of ingest)")
    gc.add_argument("--older-than", type=float, help="seconds since their start (default: the retention, 1 day)")
    for sub in (ingest, train, run, config, verify, download, preview, evaluate, gc):
        sub.add_argument("--verbose", action="store_true", help="debug output, and Spark's and petastorm's own logs")
    sections = {ingest: ("spark", "storage", "ingest"), train: ("spark", "storage", "train")}  # run, config: all
    for sub in (ingest, train, run, config):
        sub.add_argument("--config", help=f"settings YAML (default: {DEFAULT_CONFIG} when present)")
        # One option per setting (spark_mnist.config.options), a group per section, every one defaulting to None,
        # "as the config file says"; a switch also has its --no- form.  The overrides are read back by name, and
        # argparse refuses two options of one name.
        for section in sections.get(sub, SECTIONS):
            group = sub.add_argument_group(f"{section} settings", f"override the config file's {section}.* keys")
            for o in options(section):
                if o.type is bool:
                    group.add_argument(o.flag, action=argparse.BooleanOptionalAction, default=None, help=o.help)
                else:
                    metavar = None if o.choices else {int: "N", float: "X"}.get(o.type)  # str: --data DATA
                    group.add_argument(o.flag, type=o.type, choices=o.choices, help=o.help, metavar=metavar)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The config file (``--config``, else ``conf/local.yaml`` when present, else the defaults), then every setting
    option given on the command line on top.

    Raises:
        InputError: a bad config file or option value (see :func:`spark_mnist.config.load_settings`).
    """
    path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    overrides = {s: {option.name: getattr(args, option.name, None) for option in options(s)} for s in SECTIONS}
    return load_settings(path, overrides)


def _verify(args: argparse.Namespace) -> int:
    report = verify.verify_source(args.source, args.dataset, strict=not args.allow_hash_mismatch)
    sys.stdout.write(verify.format_table(report))
    return 0 if report.ok else EXIT_BAD_INPUT


def _download(args: argparse.Namespace) -> None:
    local_roots = download.LocalRoots() if args.no_local else None
    paths = download.download(args.dataset, args.to, mirrors=args.mirror, retries=args.retries, local_roots=local_roots)
    _print_json({"dataset": args.dataset, "files": {name: str(path) for name, path in paths.items()}})


def _preview(args: argparse.Namespace) -> None:
    path = plots.preview_grid(args.data, args.out, split=args.split, seed=args.seed)
    _print_json({"preview": str(path), "data": args.data, "split": args.split, "seed": args.seed})


def _gc(args: argparse.Namespace) -> None:
    _print_json({"output": args.output, "removed": clean(normalize_uri(args.output), args.older_than)})


def _evaluate(args: argparse.Namespace) -> None:
    require_extra("torch", "torch", "evaluate")
    result = evaluate.evaluate_model(args.data, args.model, batch_size=args.batch_size, split=args.split)
    sys.stdout.write(evaluate.format_report(result))
    out_png = args.out_png or os.path.join(os.path.dirname(os.path.abspath(args.model)), "confusion.png")
    try:
        print(f"confusion matrix PNG: {plots.confusion_matrix_png(result, out_png)}", flush=True)
    except InputError as e:  # no matplotlib: the report above stands; an explicit --out-png makes it an error
        if args.out_png:
            raise
        logging.getLogger("spark_mnist").warning("no confusion-matrix PNG: %s", e)


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; its exit code.  The tools run without settings or Spark; the others read the
    settings and call :func:`spark_mnist.pipeline.ingest` or :func:`spark_mnist.pipeline.train`, which check what
    they can refuse before a Spark session starts and start one only where it is needed (``train --launcher
    torchrun`` needs no pyspark).

    Raises:
        InputError: bad settings or input (the caller prints one line and exits 2).
    """
    handlers = {"verify": _verify, "download": _download, "preview": _preview, "evaluate": _evaluate, "gc": _gc}
    if args.command in handlers:  # no Spark, no settings file; only verify's exit code says more than 0
        return handlers[args.command](args) or 0
    settings = settings_from_args(args)
    if args.command == "config":
        sys.stdout.write(yaml.safe_dump(settings.dict(), sort_keys=False))
    elif args.command == "ingest":
        manifest = pipeline.ingest(None, settings, verbose=args.verbose)
        rows = {k: v.rows for k, v in manifest.splits.items()}
        _print_json({"output": settings.ingest.output, "dataset": manifest.dataset, "rows": rows})
    else:
        result = pipeline.train(None, settings, ingest_first=args.command == "run", verbose=args.verbose)
        _print_json({k: v for k, v in result.items() if k != "history"})
    return 0


def _print_json(result: dict) -> None:
    """A command's result as one JSON line on stdout, URIs redacted."""
    print(redact(json.dumps(result)), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spark-mnist`` console script."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return run_command(args)
    except InputError as e:
        print(redact(f"spark-mnist: error: {e}"), file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 - printed as Python would, with every URI's credentials redacted
        sys.stderr.write(redact("".join(traceback.format_exception(type(e), e, e.__traceback__))))
        return 1


if __name__ == "__main__":
    sys.exit(main())
