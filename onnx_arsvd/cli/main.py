"""The ``onnx-arsvd`` command line: inspect | compress | verify | bench.

``main(argv) -> int`` never lets a traceback reach the user: every error is one line on stderr, exit 2
for a usage error (bad argument, path or data), 1 for a model that cannot be handled or a failed run,
130 for Ctrl-C; ``--debug`` also prints the traceback. Every output path is checked against every
input path before any work. The options are generated from :mod:`onnx_arsvd.config` (:mod:`.options`);
heavy imports (onnx, onnxruntime) happen inside the handlers so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from onnx_arsvd.cli.options import add_options, add_policy_options, as_flags, embedding_policy, given, policy
from onnx_arsvd.config import CompressOptions, DataOptions, FactorOptions, LatencyGuard, OutputOptions
from onnx_arsvd.errors import ArsvdError, InvalidInputError
from onnx_arsvd.methods.quantize.configs import QUANTIZERS, quantization
from onnx_arsvd.search.budget import Budget

__all__ = ["build_parser", "main"]

_BENCH = ("batches", "threads", "model_seconds")
"""The latency guard's settings that ``bench`` shares (one flag, one default)."""


def _add_printing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--report", metavar="PATH",
                        help="also write the report to PATH: Markdown if it ends in .md, else JSON")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no phase lines")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="a line per phase with its count and time (the default when stderr is not a terminal)")


def _add_bench(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("benchmark")
    add_options(group, LatencyGuard, only=_BENCH)
    group.add_argument("--providers", metavar="P1,P2",
                       help="execution providers: cpu, cuda, tensorrt or full names (default: all that run here)")
    group.add_argument("--no-memory", action="store_true", help="skip the child-process memory probe")
    group.add_argument("--plot", metavar="PNG", help="write a plot of the ratios (needs the 'plot' extra)")


def _add_factoring(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("rank policy and factoring")
    add_policy_options(group)
    add_options(group, FactorOptions)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its four subcommands, generated from the option dataclasses."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error instead of one line")
    parser = argparse.ArgumentParser(
        prog="onnx-arsvd", description="Make a trained ONNX model smaller after export: factor its dense layers "
        "(adaptive-rank SVD), check the result, benchmark it.", parents=[debug])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", parents=[debug], help="list the factorable layers and what the policy "
                                  "would do")
    inspect.add_argument("model", help="the ONNX model to read (never modified)")
    _add_factoring(inspect)
    _add_printing(inspect)

    compress = commands.add_parser("compress", parents=[debug], help="factor the dense layers, write the model, "
                                   "verify it")
    compress.add_argument("model", help="the ONNX model to compress (never modified)")
    compress.add_argument("-o", "--output", required=True, help="where to write the compressed model")
    add_options(compress, OutputOptions)
    compress.add_argument("--bench", action="store_true", help="benchmark the original and the written model")
    compress.add_argument("--quantize", choices=list(QUANTIZERS),
                          help="quantize the factored model with onnxruntime: int8 dynamic (reduce_range without "
                               "VNNI), int4 weight-only MatMulNBits, or int8 with 4-bit embedding tables; under a "
                               "budget every candidate is quantized")
    budget = compress.add_argument_group("budget: the fewest parameters within an accuracy budget, or the most "
                                         "accurate model within a parameter or latency target (splits --data)")
    add_options(budget, Budget)
    guard = compress.add_argument_group("latency guard")
    guard.add_argument("--guard", choices=["latency"],
                       help="latency: keep each layer dense where factoring it is not faster on --target, then time "
                            "the whole model (batch sizes from --batch); on by itself for a latency budget")
    add_options(guard, LatencyGuard, skip=_BENCH)
    _add_factoring(compress)
    add_options(compress.add_argument_group("data"), DataOptions)
    _add_bench(compress)
    _add_printing(compress)

    verify = commands.add_parser("verify", parents=[debug], help="compare a compressed model with its original in "
                                 "onnxruntime")
    verify.add_argument("original", help="the reference model")
    verify.add_argument("compressed", help="the model to compare with it")
    add_options(verify.add_argument_group("data"), DataOptions)
    verify.add_argument("--providers", help="execution providers to verify on, comma-separated: cpu (default), cuda")
    _add_printing(verify)

    bench = commands.add_parser("bench", parents=[debug], help="latency, memory and accuracy of both models on every "
                                "execution provider")
    bench.add_argument("original", help="the reference model")
    bench.add_argument("compressed", help="the model to compare with it")
    add_options(bench.add_argument_group("data"), DataOptions, skip=("batch_size", "score_threshold"))
    _add_bench(bench)
    _add_printing(bench)
    return parser


def _version() -> str:
    from onnx_arsvd import __version__

    return __version__


def compress_options(args: argparse.Namespace) -> CompressOptions:
    """The options the flags give; what they leave open stays open (:mod:`onnx_arsvd.rules` decides it)."""
    factor = FactorOptions(**given(args, FactorOptions), policy=policy(args), embedding_policy=embedding_policy(args))
    budget_values = given(args, Budget)
    budget = Budget(**budget_values) if budget_values else None
    timed = args.guard is not None or (budget is not None and budget.prices_latency)
    return CompressOptions(factor=factor, data=DataOptions(**given(args, DataOptions)),
                           output=OutputOptions(**given(args, OutputOptions), progress=not args.quiet),
                           budget=budget, guard=LatencyGuard(**given(args, LatencyGuard)) if timed else None,
                           quantize=quantization(args.quantize) if args.quantize else None)


def _check_paths(args: argparse.Namespace) -> None:
    """Every output path writable and clashing with no input or other output, before any work."""
    from onnx_arsvd.io.models import external_data_files, load_model
    from onnx_arsvd.io.paths import PathLike, check_paths

    models = [args.model] if args.command in ("inspect", "compress") else [args.original, args.compressed]
    inputs: dict[str, PathLike | Iterable[PathLike] | None] = {}
    for index, model in enumerate(models):
        label = "input model" if len(models) == 1 else ("original model", "compressed model")[index]
        inputs[label] = model
        inputs[f"{label}'s external data"] = external_data_files(load_model(model))
    for option in ("data", "labels", "calibration"):
        inputs[f"--{option}"] = getattr(args, option, None)
    outputs = {"-o": getattr(args, "output", None), "--report": args.report, "--plot": getattr(args, "plot", None)}
    check_paths(outputs, inputs)
    if outputs["--plot"] and importlib.util.find_spec("matplotlib") is None:
        raise InvalidInputError("--plot needs matplotlib: pip install 'onnx-arsvd[plot]'")


def _providers(args: argparse.Namespace) -> list[str] | None:
    return args.providers.split(",") if args.providers else None


def _bench(args: argparse.Namespace, original: str, compressed: str | Path, verified_on: tuple[str, ...] = ()) -> Any:
    from onnx_arsvd.measure.benchmark import benchmark_models

    timing = LatencyGuard(**given(args, LatencyGuard, only=_BENCH))
    data = DataOptions(**given(args, DataOptions))
    return benchmark_models(original, compressed, batches=timing.batches, threads=timing.threads, dims=data.dims,
                            providers=_providers(args), min_seconds=timing.model_seconds, memory=not args.no_memory,
                            accuracy_data=args.data, progress=not args.quiet, one_at_a_time=data.one_at_a_time,
                            verified_on=verified_on)


def _report_text(args: argparse.Namespace, markdown: str, machine: str) -> str:
    """What ``--report`` holds: Markdown for a ``.md`` path, else JSON."""
    return (_text(markdown) if args.report.endswith(".md") else machine) + "\n"


Stage = Callable[[str, Callable[[Path], object], str], object]
"""Writes a file through a temporary one: :func:`onnx_arsvd.io.output.write_file`, or staged to place later."""


def _stage_report(args: argparse.Namespace, markdown: str, machine: str, stage: Stage) -> None:
    if args.report:
        text = _report_text(args, markdown, machine)
        stage(args.report, lambda temporary: temporary.write_text(text), "report")


def _text(text: str) -> str:
    """``text`` as the CLI shows it: option names as flags, and the bytes of a file name that is not UTF-8
    (surrogate escapes) as U+FFFD, so it can be printed and written as UTF-8."""
    return as_flags(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _print(args: argparse.Namespace, human: str, markdown: str, machine: str) -> None:
    print(machine.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if args.json
          else _text(markdown if args.markdown else human))


def _emit(args: argparse.Namespace, human: str, markdown: str, machine: str) -> None:
    """Write ``--report`` (for commands that write nothing else), then print."""
    if args.report:
        from onnx_arsvd.io.output import write_file

        text = _report_text(args, markdown, machine)
        write_file(args.report, lambda temporary: temporary.write_text(text), "report")
    _print(args, human, markdown, machine)


def _compress(args: argparse.Namespace) -> None:
    from onnx_arsvd import api
    from onnx_arsvd.report.model_report import format_report, report_to_json

    options = compress_options(args)
    if args.bench:  # bad benchmark options must fail before anything is written
        from onnx_arsvd.measure.benchmark import discover_providers

        discover_providers(_providers(args))
    outputs: dict[str, str] = {}

    def before_placing(pending: api.PendingOutput) -> None:
        """Benchmark the staged model, and stage the report and plot to be placed with it."""
        human, markdown = format_report(pending.report), format_report(pending.report, True)
        machine = report_to_json(pending.report)
        if args.bench:
            from onnx_arsvd.report.bench_report import benchmark_to_json, format_benchmark

            staged = pending.path if pending.path is not None else args.output
            verified = (pending.report.verification.provider,) if pending.report.verification is not None else ()
            result = dataclasses.replace(_bench(args, args.model, staged, verified), models=(args.model, args.output))
            human += "\n\n" + format_benchmark(result)
            markdown += "\n\n" + format_benchmark(result, True)
            machine = json.dumps(json.loads(machine) | {"benchmark": json.loads(benchmark_to_json(result))}, indent=2)
            _plot(args, result, pending.stage)
        _stage_report(args, markdown, machine, pending.stage)
        outputs.update(human=human, markdown=markdown, machine=machine)

    try:
        api.compress(args.model, args.output, options, before_placing=before_placing)
    except api.BudgetMissedError as error:  # show what the run measured; nothing was written
        _print(args, format_report(error.report), format_report(error.report, True), report_to_json(error.report))
        raise
    _print(args, outputs["human"], outputs["markdown"], outputs["machine"])


def _run(args: argparse.Namespace) -> int:
    from onnx_arsvd import api
    from onnx_arsvd.report.model_report import format_report, format_verification, report_to_json, verification_to_dict

    _verbosity(args)
    _check_paths(args)
    if args.command == "inspect":
        factor = FactorOptions(**given(args, FactorOptions), policy=policy(args),
                               embedding_policy=embedding_policy(args))
        report = api.inspect_model(args.model, CompressOptions(factor=factor), progress=not args.quiet)
        _emit(args, format_report(report), format_report(report, True), report_to_json(report))
    elif args.command == "compress":
        _compress(args)
    elif args.command == "verify":
        from onnx_arsvd.measure.benchmark import discover_providers

        providers, skipped = discover_providers(_providers(args) or ["cpu"])
        for note in skipped:
            print(f"onnx-arsvd: {note}", file=sys.stderr)
        data = DataOptions(**given(args, DataOptions))
        verifications = [api.verify(args.original, args.compressed, data=data.data, labels=data.labels, dims=data.dims,
                                    samples=data.samples, batch_size=data.batch_size, provider=provider,
                                    progress=not args.quiet, one_at_a_time=data.one_at_a_time,
                                    score_threshold=data.score_threshold)
                         for provider in providers]
        _emit(args, "\n\n".join(format_verification(v) for v in verifications),
              "\n\n".join(format_verification(v, True) for v in verifications),
              json.dumps([verification_to_dict(v) for v in verifications] if len(verifications) > 1
                         else verification_to_dict(verifications[0]), indent=2))
    else:
        from onnx_arsvd.report.bench_report import benchmark_to_json, format_benchmark

        result = _bench(args, args.original, args.compressed)
        _plot(args, result)
        _emit(args, format_benchmark(result), format_benchmark(result, True), benchmark_to_json(result))
    return 0


def _plot(args: argparse.Namespace, result: Any, stage: Stage | None = None) -> None:
    """Write ``--plot`` now, or stage it to be placed with the model (``stage``)."""
    if args.plot:
        from onnx_arsvd.io.output import write_file
        from onnx_arsvd.report.bench_report import plot_benchmark

        (stage or write_file)(args.plot, lambda temporary: plot_benchmark(result, temporary), "plot")


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (tests replace it): ``onnx-arsvd: warning: ...`` for a
    warning, ``onnx-arsvd: ...`` for a phase's line."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "onnx-arsvd: warning: " if record.levelno >= logging.WARNING else "onnx-arsvd: "
        print(_text(prefix + record.getMessage()), file=sys.stderr)


def _log_to_stderr() -> None:
    """The library's messages (logger ``onnx_arsvd``) as lines on stderr; warnings only until the options say."""
    logger = logging.getLogger("onnx_arsvd")
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        logger.addHandler(_StderrHandler())
    logger.setLevel(logging.WARNING)


def _verbosity(args: argparse.Namespace) -> None:
    """Each phase's line (count and time) with ``-v``, and by default when stderr is not a terminal (where no bar
    shows); never with ``-q``."""
    verbose = args.verbose or (not args.quiet and not sys.stderr.isatty())
    logging.getLogger("onnx_arsvd").setLevel(logging.INFO if verbose and not args.quiet else logging.WARNING)


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(_text(f"onnx-arsvd: error: {message}"), file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status. Every error is one line on stderr (``--debug``: the traceback)."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        _log_to_stderr()
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit_:
            return int(exit_.code or 0)
        return _run(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("onnx-arsvd: interrupted", file=sys.stderr)
        return 130
    except InvalidInputError as error:
        return _fail(str(error), 2, debug)
    except ArsvdError as error:
        return _fail(str(error), 1, debug)
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        return _fail(f"{where}{error.strerror or error}", 1, debug)
    except MemoryError:
        return _fail("out of memory", 1, debug)
    except Exception as error:  # a bug: still one line, with the way to see more
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return _fail(f"internal error ({type(error).__name__}{': ' + first if first else ''}); "
                     "run again with --debug for the traceback", 1, debug)
