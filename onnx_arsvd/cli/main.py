"""The ``onnx-arsvd`` command line: inspect | compress | verify.

``main(argv) -> int`` never lets a traceback reach the user: every error is one line on stderr, exit 2
for a usage error (bad argument, path or data), 1 for a model that cannot be handled or a failed run,
130 for Ctrl-C; ``--debug`` also prints the traceback. Every output path is checked against every
input path before any work. Heavy imports (onnx, onnxruntime) happen inside the handlers so
``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from onnx_arsvd.errors import ArsvdError, InvalidInputError

__all__ = ["main"]

_POLICY_PARAMS = {"energy": "tau", "entropy": "scale", "rank": "rank", "ratio": "ratio"}


def _add_policy_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("rank policy")
    group.add_argument("--policy", help="energy (default), entropy, rank or ratio")
    group.add_argument("--tau", type=float,
                       help="energy policy: share of the weight's energy sum(s^2) to keep, in (0, 1] (default 0.99)")
    group.add_argument("--output-tau", type=float, metavar="TAU",
                       help="energy policy with --method whitened: share of each layer's output energy on the "
                            "calibration inputs to keep (a different scale from --tau: 0.99 of the output energy "
                            "is often a far lower rank than 0.99 of the weight's)")
    group.add_argument("--scale", type=float, help="entropy policy: multiplier of the effective rank (default 1)")
    group.add_argument("--rank", type=int, help="rank policy: the rank of every layer")
    group.add_argument("--ratio", type=float, help="ratio policy: rank = ratio * min(m, n), in (0, 1]")
    group.add_argument("--max-rank-fraction", type=float, default=0.8, metavar="F",
                       help="factor a layer only if rank <= F * m*n/(m+n) (default 0.8: demand a real saving)")
    group.add_argument("--min-params", type=int, default=4096, metavar="N",
                       help="leave weights with fewer than N parameters dense "
                            "(default 4096; heads are often this small)")
    group.add_argument("--method", choices=["svd", "whitened", "lp"],
                       help="svd: minimise the weight error; whitened: minimise the layer's output error on "
                            "--calibration inputs; lp: robust l_p fit of the weight's rows, see --p "
                            "(default: whitened with --max-drop/--min-cosine, else svd)")
    group.add_argument("--p", type=float, default=1.0, help="the p of --method lp, in [1, 2] (default 1)")
    group.add_argument("--embedding-tau", type=float, metavar="TAU",
                       help="also factor embedding tables (Gather on a constant) at this energy threshold; "
                            "they usually need a higher one than dense layers (default: keep them dense)")
    group.add_argument("--calibration", metavar="NPZ",
                       help="inputs for --method whitened: arrays keyed by input name, first axis = samples")
    group.add_argument("--factor-heads", action="store_true",
                       help="also factor layers that feed a graph output (classifier heads); the default does so "
                            "only with --data or --calibration, real inputs that check them")
    group.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="factor N weights at once, one BLAS thread each, N capped at the cores (default 1); "
                            "the output is the same whatever N")
    group.add_argument("--include", action="append", default=[], metavar="GLOB",
                       help="only layers whose node or weight name matches (repeatable)")
    group.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                       help="skip layers whose node or weight name matches (repeatable)")


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("verification inputs")
    group.add_argument("--data", help=".npz of arrays keyed by input name (first axis = samples; an input of a fixed "
                                      "shape that takes one value per call may be given once), optional 'labels'")
    group.add_argument("--labels", help=".npy of integer labels: adds top-1 accuracy and macro-F1")
    group.add_argument("--dim", action="append", default=[], metavar="NAME=VALUE",
                       help="value of a dynamic dimension for generated inputs (default 1; repeatable)")
    group.add_argument("--samples", type=int, default=16, help="generated input batches (default 16)")


def _add_batch_size_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64, metavar="N",
                        help="samples per onnxruntime call when verifying --data (default 64; bounds memory)")
    _add_one_at_a_time_option(parser)


def _add_one_at_a_time_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--one-at-a-time", action="store_true", default=None,
                        help="hold one model in onnxruntime at a time: verification keeps the original's outputs, "
                             "timing runs each model alone in turn (chosen by itself when both models' weights "
                             "exceed half the available memory)")


def _add_bench_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("benchmark")
    group.add_argument("--batch", default="1,32", metavar="B1,B2",
                       help="batch sizes for dynamic batch dims (default 1,32; fixed dims are respected)")
    group.add_argument("--providers", metavar="P1,P2",
                       help="execution providers: cpu, cuda, tensorrt or full names (default: all that run here)")
    group.add_argument("--threads", type=int, default=0, help="intra-op threads per session (default: onnxruntime's)")
    group.add_argument("--seconds", type=float, default=1.0, help="minimum measuring time per batch size (default 1)")
    group.add_argument("--no-memory", action="store_true", help="skip the child-process memory probe")
    group.add_argument("--plot", metavar="PNG", help="write a plot of the ratios (needs the 'plot' extra)")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--report", metavar="PATH",
                        help="also write the report to PATH: Markdown if it ends in .md, else JSON")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its three subcommands."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error instead of one line")
    parser = argparse.ArgumentParser(
        prog="onnx-arsvd", description="Factor the dense layers of an ONNX model with adaptive-rank SVD.",
        parents=[debug],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", parents=[debug],
                                  help="list the factorable layers and what the policy would do")
    inspect.add_argument("model", help="the ONNX model to read (never modified)")
    _add_policy_options(inspect)
    _add_output_options(inspect)

    compress = commands.add_parser("compress", parents=[debug],
                                   help="factor the dense layers, write the model, verify it")
    compress.add_argument("model", help="the ONNX model to compress (never modified)")
    compress.add_argument("-o", "--output", required=True, help="where to write the compressed model")
    compress.add_argument("--external-data", action="store_true",
                          help="always write weights as external data "
                               "(automatic above 1.8 GB or when the input has it)")
    compress.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    compress.add_argument("--bench", action="store_true", help="benchmark the original and the written model")
    budget = compress.add_argument_group("budget: the fewest parameters within an accuracy budget, or the most "
                                         "accurate model within a parameter or latency target (splits --data)")
    budget.add_argument("--max-drop", type=float, metavar="POINTS",
                        help="at most this many accuracy points lost (needs labels in --data or --labels)")
    budget.add_argument("--min-cosine", type=float,
                        help="mean cosine of every output with the original's at least this")
    budget.add_argument("--target-params", type=float, metavar="F",
                        help="keep at most this fraction of the dense-layer parameters, as accurately as possible")
    budget.add_argument("--target-latency", type=float, metavar="F",
                        help="the whole model at most F times the original's latency on --target at every --batch "
                             "size (a 95%% upper bound in the search, the median in the final timing), as accurately "
                             "as possible; with --max-drop/--min-cosine, the fastest model within those, timed; "
                             "turns on --guard latency")
    budget.add_argument("--holdout", type=float, default=0.4,
                        help="share of --data held out to report on, never used to choose ranks (default 0.4)")
    budget.add_argument("--fit-share", type=float, default=0.5, metavar="F",
                        help="share of the rest that fits whitened factors and refits; the others judge "
                             "candidates (default 0.5)")
    budget.add_argument("--allocation", choices=["global", "threshold"], default="global",
                        help="global (default): every layer's rank from one knapsack over the layers' loss curves; "
                             "threshold: one output-energy threshold for all layers")
    budget.add_argument("--rank-multiple", type=int, default=8, metavar="Q",
                        help="ranks in multiples of Q, finer for small layers (default 8: CPU kernels' preference)")
    budget.add_argument("--minimize", choices=["params", "latency"], default="params",
                        help="what the search makes least within --max-drop/--min-cosine: parameters (default), or "
                             "the dense layers' latency measured on --target at the --batch sizes (turns on "
                             "--guard latency)")
    budget.add_argument("--sequential", action="store_true",
                        help="refit each candidate's factors layer by layer on the partially compressed model "
                             "(slower: one activation pass per layer input; global allocation only)")
    compress.add_argument("--quantize", choices=["int8", "int4", "int8+int4-tables"],
                          help="quantize the factored model with onnxruntime: int8 dynamic (reduce_range without "
                               "VNNI), int4 weight-only MatMulNBits, or int8 with 4-bit embedding tables; under a "
                               "budget every candidate is quantized")
    compress.add_argument("--guard", choices=["latency"],
                          help="latency: keep each layer dense where factoring it is not faster on --target, "
                               "then time the whole model (batch sizes from --batch)")
    compress.add_argument("--target", default="cpu",
                          help="execution provider the guard times on: cpu (default), cuda, ...")
    compress.add_argument("--guard-seconds", type=float, default=0.3,
                          help="minimum measuring time per layer and batch size (default 0.3)")
    compress.add_argument("--guard-margin", type=float, default=0.0, metavar="M",
                          help="factor a layer only if it is at least M faster, e.g. 0.05 (default 0: any gain)")
    _add_policy_options(compress)
    _add_data_options(compress)
    _add_batch_size_option(compress)
    _add_bench_options(compress)
    _add_output_options(compress)

    verify = commands.add_parser("verify", parents=[debug],
                                 help="compare a compressed model with its original in onnxruntime")
    verify.add_argument("original", help="the reference model")
    verify.add_argument("compressed", help="the model to compare with it")
    _add_data_options(verify)
    _add_batch_size_option(verify)
    verify.add_argument("--providers",
                        help="execution providers to verify on, comma-separated: cpu (default), cuda, ...")
    _add_output_options(verify)

    bench = commands.add_parser("bench", parents=[debug],
                                help="latency, memory and accuracy of both models on every execution provider")
    bench.add_argument("original", help="the reference model")
    bench.add_argument("compressed", help="the model to compare with it")
    _add_data_options(bench)
    _add_bench_options(bench)
    _add_one_at_a_time_option(bench)
    _add_output_options(bench)
    return parser


def _policy(args: argparse.Namespace):
    from onnx_arsvd.numerics.rank import make_policy

    if getattr(args, "budget", None) is not None:
        settings = [*_POLICY_PARAMS.values(), "output_tau"]
        if args.policy is not None or any(getattr(args, p) is not None for p in settings):
            raise InvalidInputError("a budget chooses the ranks itself: leave out --policy and its settings")
        return None
    whitened = args.method == "whitened"
    if args.output_tau is not None and not whitened:
        raise InvalidInputError("--output-tau is a share of output energy: it needs --method whitened (else use --tau)")
    if whitened and args.tau is not None:
        raise InvalidInputError("with --method whitened the threshold is on each layer's output energy: "
                                "use --output-tau (--tau is a share of the weight's energy)")
    if args.output_tau is not None:
        args.tau = args.output_tau
    given = [name for name, param in _POLICY_PARAMS.items() if getattr(args, param) is not None]
    name = args.policy or (given[0] if len(given) == 1 else "energy")  # --ratio 0.3 alone means --policy ratio
    for other, param in _POLICY_PARAMS.items():
        if other != name and getattr(args, param) is not None:
            raise InvalidInputError(f"--{param} does not apply to --policy {name}")
    setting = _POLICY_PARAMS.get(name)
    value = getattr(args, setting) if setting is not None else None
    return make_policy(name, **({setting: value} if setting is not None and value is not None else {}))


def _embedding_policy(args: argparse.Namespace):
    from onnx_arsvd.numerics.rank import EnergyPolicy

    return EnergyPolicy(args.embedding_tau) if args.embedding_tau is not None else None


def _factor_heads(args: argparse.Namespace) -> bool:
    """Heads are factored when asked, or when real inputs (--data, --calibration) check the result."""
    return bool(args.factor_heads or getattr(args, "data", None) or args.calibration)


def _labelled(path: str, model: str) -> bool | None:
    """Whether an .npz holds a 'labels' array the model's first output can be scored against; None when the data
    cannot be read (the data check says why later)."""
    import numpy as np

    from onnx_arsvd.io.data import label_problem
    from onnx_arsvd.io.models import load_model

    try:
        with np.load(path, allow_pickle=False) as archive:
            if "labels" not in archive.files:
                return False
    except (OSError, ValueError):
        return None
    return not label_problem(load_model(model))


def _budget(args: argparse.Namespace):
    from onnx_arsvd.search.budget import Budget

    search = {"holdout": args.holdout, "fit_share": args.fit_share, "allocation": args.allocation,
              "rank_multiple": args.rank_multiple, "sequential": args.sequential, "minimize": args.minimize}
    if all(getattr(args, kind) is None for kind in ("max_drop", "min_cosine", "target_params", "target_latency")):
        chosen = args.policy is not None or any(getattr(args, p) is not None for p in (*_POLICY_PARAMS.values(),
                                                                                       "output_tau"))
        labelled = None if args.data is None or chosen else bool(args.labels) or _labelled(args.data, args.model)
        if labelled is None:
            if args.sequential:
                raise InvalidInputError("--sequential refits under a budget (--max-drop, --min-cosine, "
                                        "--target-params or --target-latency, or --data with no rank policy)")
            return None
        budget = Budget(max_drop=1.0, **search) if labelled else Budget(min_cosine=0.99, **search)
        logging.getLogger("onnx_arsvd").warning(
            f"no rank policy given: choosing ranks for {budget.describe()} on --data (give --tau, --ratio, "
            "--max-drop, ... to choose yourself)")
        return budget

    return Budget(max_drop=args.max_drop, min_cosine=args.min_cosine, target_params=args.target_params,
                  target_latency=args.target_latency, **search)


def _dims(pairs: Sequence[str]) -> dict[str, int]:
    dims: dict[str, int] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value.strip().isdigit() or int(value) < 1:
            raise InvalidInputError(f"--dim expects NAME=POSITIVE_INTEGER, got {pair!r}")
        dims[name] = int(value)
    return dims


def _version() -> str:
    from onnx_arsvd import __version__

    return __version__


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


def _batches(text: str) -> list[int]:
    try:
        batches = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise InvalidInputError(f"--batch expects positive integers separated by commas, got {text!r}")
    return batches


def _providers(args: argparse.Namespace) -> list[str] | None:
    return args.providers.split(",") if args.providers else None


def _bench(args: argparse.Namespace, original: str, compressed: str | Path):
    from onnx_arsvd.measure.benchmark import benchmark_models

    return benchmark_models(
        original, compressed, batches=_batches(args.batch), threads=args.threads, dims=_dims(args.dim),
        providers=_providers(args), min_seconds=args.seconds,
        memory=not args.no_memory, accuracy_data=args.data, progress=not args.quiet,
        one_at_a_time=args.one_at_a_time,
    )


def _report_text(args: argparse.Namespace, markdown: str, machine: str) -> str:
    """What ``--report`` holds: Markdown for a ``.md`` path, else JSON."""
    return _text(markdown if args.report.endswith(".md") else machine) + "\n"


Stage = Callable[[str, Callable[[Path], object], str], object]
"""Writes a file through a temporary one: :func:`onnx_arsvd.io.output.write_file`, or staged to place later."""


def _stage_report(args: argparse.Namespace, markdown: str, machine: str, stage: Stage) -> None:
    if args.report:
        text = _report_text(args, markdown, machine)
        stage(args.report, lambda temporary: temporary.write_text(text), "report")


def _text(text: str) -> str:
    """``text`` with the bytes of a file name that is not UTF-8 (surrogate escapes) shown as U+FFFD, so it can be
    printed and written as UTF-8."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _print(args: argparse.Namespace, human: str, markdown: str, machine: str) -> None:
    print(_text(machine if args.json else markdown if args.markdown else human))


def _emit(args: argparse.Namespace, human: str, markdown: str, machine: str) -> None:
    """Write ``--report`` (for commands that write nothing else), then print."""
    if args.report:
        from onnx_arsvd.io.output import write_file

        text = _report_text(args, markdown, machine)
        write_file(args.report, lambda temporary: temporary.write_text(text), "report")
    _print(args, human, markdown, machine)


def _run(args: argparse.Namespace) -> int:
    import json

    from onnx_arsvd import api
    from onnx_arsvd.report.model_report import format_report, format_verification, report_to_json, verification_to_dict

    _check_paths(args)
    if args.command == "inspect":
        report = api.inspect_model(args.model, policy=_policy(args), include=args.include, exclude=args.exclude,
                                   max_rank_fraction=args.max_rank_fraction, min_params=args.min_params,
                                   method=args.method or "svd", calibration=args.calibration, lp_power=args.p,
                                   embedding_policy=_embedding_policy(args), factor_heads=_factor_heads(args),
                                   progress=not args.quiet, jobs=args.jobs)
        _emit(args, format_report(report), format_report(report, True), report_to_json(report))
    elif args.command == "compress":
        guard = None
        args.budget = _budget(args)
        if args.minimize == "latency":
            if args.budget is None:
                raise InvalidInputError("--minimize latency needs an accuracy budget (--max-drop or --min-cosine) "
                                        "and --data")
            args.guard = "latency"  # the guard's table prices the ranks, and then checks the result
        if args.target_latency is not None:
            args.guard = "latency"  # the guard times each candidate and prices the ranks
        if args.bench or args.guard:  # bad benchmark options must fail before anything is written
            batches = _batches(args.batch)
        if args.bench:
            from onnx_arsvd.measure.benchmark import discover_providers

            discover_providers(_providers(args))
        if args.guard:
            from onnx_arsvd.measure.guard import LatencyGuard

            guard = LatencyGuard(target=args.target, batches=tuple(batches), threads=args.threads,
                                 margin=args.guard_margin, layer_seconds=args.guard_seconds,
                                 model_seconds=args.seconds)
        outputs: dict[str, str] = {}

        def before_placing(pending: api.PendingOutput) -> None:
            """Benchmark the staged model, and stage the report and plot to be placed with it."""
            human, markdown = format_report(pending.report), format_report(pending.report, True)
            machine = report_to_json(pending.report)
            if args.bench:
                from onnx_arsvd.report.bench_report import benchmark_to_json, format_benchmark

                staged = pending.path if pending.path is not None else args.output
                result = dataclasses.replace(_bench(args, args.model, staged), models=(args.model, args.output))
                human += "\n\n" + format_benchmark(result)
                markdown += "\n\n" + format_benchmark(result, True)
                machine = json.dumps(json.loads(machine) | {"benchmark": json.loads(benchmark_to_json(result))},
                                     indent=2)
                _plot(args, result, pending.stage)
            _stage_report(args, markdown, machine, pending.stage)
            outputs.update(human=human, markdown=markdown, machine=machine)

        try:
            api.compress(
                args.model, args.output, policy=_policy(args), budget=args.budget, include=args.include,
                exclude=args.exclude,
                max_rank_fraction=args.max_rank_fraction, min_params=args.min_params, method=args.method,
                calibration=args.calibration, lp_power=args.p, embedding_policy=_embedding_policy(args),
                factor_heads=_factor_heads(args),
                external_data=True if args.external_data else None, check=not args.no_verify,
                progress=not args.quiet,
                data=args.data, labels=args.labels, dims=_dims(args.dim), samples=args.samples,
                batch_size=args.batch_size, guard=guard, jobs=args.jobs, quantize=args.quantize,
                one_at_a_time=args.one_at_a_time, before_placing=before_placing,
            )
        except api.BudgetMissedError as error:  # show what the run measured; nothing was written
            report = error.report
            print(_text(report_to_json(report) if args.json else format_report(report, args.markdown)))
            raise
        _print(args, outputs["human"], outputs["markdown"], outputs["machine"])
    elif args.command == "verify":
        from onnx_arsvd.measure.benchmark import discover_providers

        providers, skipped = discover_providers(_providers(args) or ["cpu"])
        for note in skipped:
            print(f"onnx-arsvd: {note}", file=sys.stderr)
        verifications = [api.verify(args.original, args.compressed, data=args.data, labels=args.labels,
                                    dims=_dims(args.dim), samples=args.samples, batch_size=args.batch_size,
                                    provider=provider, progress=not args.quiet, one_at_a_time=args.one_at_a_time)
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


def _plot(args: argparse.Namespace, result, stage: Stage | None = None) -> None:
    """Write ``--plot`` now, or stage it to be placed with the model (``stage``)."""
    if args.plot:
        from onnx_arsvd.io.output import write_file
        from onnx_arsvd.report.bench_report import plot_benchmark

        (stage or write_file)(args.plot, lambda temporary: plot_benchmark(result, temporary), "plot")


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (tests replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(_text(self.format(record)), file=sys.stderr)


def _log_to_stderr() -> None:
    """The library's warnings (logger ``onnx_arsvd``) as ``onnx-arsvd: warning: ...`` lines on stderr."""
    logger = logging.getLogger("onnx_arsvd")
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("onnx-arsvd: warning: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)


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
