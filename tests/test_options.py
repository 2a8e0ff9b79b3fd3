"""One source for options: the CLI is generated from the option dataclasses, and the CLI and the API decide alike."""

from __future__ import annotations

import hashlib
from dataclasses import fields
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_arsvd import compress
from onnx_arsvd.cli.main import build_parser, compress_options, main
from onnx_arsvd.cli.options import as_flags
from onnx_arsvd.config import CompressOptions, DataOptions, FactorOptions, LatencyGuard, OutputOptions
from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.io.models import load_model
from onnx_arsvd.numerics.rank import FixedRankPolicy
from onnx_arsvd.rules import decide
from onnx_arsvd.search.budget import Budget
from tests.conftest import MODELS, make_mlp


def _args(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(["compress", "m.onnx", "-o", "o.onnx", *argv])


def test_flags_left_out_take_the_dataclass_defaults() -> None:
    """Every generated option defaults to "not given": the field's own default applies, nowhere restated."""
    options = compress_options(_args("-q"))
    assert options == CompressOptions(factor=FactorOptions(), data=DataOptions(), output=OutputOptions())
    help_text = build_parser()._subparsers._group_actions[0].choices["compress"].format_help()  # type: ignore[union-attr]
    for cls in (FactorOptions, DataOptions, Budget, LatencyGuard):
        for f in fields(cls):
            if (f.metadata.get("cli") and f.metadata.get("default_text") is None and isinstance(f.default, (int, float))
                    and not isinstance(f.default, bool)):
                assert f"(default: {f.default})" in " ".join(help_text.split()), f.name


def test_flags_set_the_fields_they_are_generated_from() -> None:
    options = compress_options(_args("--max-rank-fraction", "0.5", "--min-params", "0", "--include", "a*", "--include",
                                     "b*", "--dim", "seq=8", "--no-verify", "--max-drop", "0.5", "--holdout", "0.3",
                                     "--sequential", "--guard", "latency", "--batch", "1,8", "--guard-margin", "0.1",
                                     "--ratio", "0.25", "--quantize", "int8"))
    assert options.factor.max_rank_fraction == 0.5 and options.factor.min_params == 0
    assert options.factor.include == ("a*", "b*") and options.factor.policy is not None
    assert options.data.dims == {"seq": 8} and options.output.check is False
    assert options.budget == Budget(max_drop=0.5, holdout=0.3, sequential=True)
    assert options.guard == LatencyGuard(batches=(1, 8), margin=0.1)
    assert options.quantize is not None and options.quantize.mode == "int8"


def test_option_names_in_messages_are_shown_as_flags() -> None:
    assert as_flags("give `data`, or `factor_heads`; see `max_rank_fraction` and `batches`") == (
        "give --data, or --factor-heads; see --max-rank-fraction and --batch")


def test_the_api_takes_fields_by_name_and_refuses_unknown_ones() -> None:
    options = CompressOptions().replace(policy=FixedRankPolicy(4), data="x.npz", check=False, quantize="int8")
    assert options.factor.policy == FixedRankPolicy(4) and options.data.data == "x.npz"
    assert options.output.check is False and options.quantize is not None and options.quantize.mode == "int8"
    with pytest.raises(InvalidInputError, match="unknown option taus"):
        CompressOptions().replace(taus=0.9)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("with_data", [False, True])
def test_the_cli_and_the_api_write_the_same_model_for_the_same_inputs(with_data: bool, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Without data: heads stay dense in both. With data and no policy: both search the default budget."""
    model = MODELS / "digits_mlp.onnx"
    data = ["--data", str(MODELS / "digits_test.npz")] if with_data else ["--tau", "0.8"]
    assert main(["compress", str(model), "-o", str(tmp_path / "cli.onnx"), "-q", "--min-params", "0", *data]) == 0
    kwargs = {"data": MODELS / "digits_test.npz"} if with_data else {"policy": compress_options(
        _args("--tau", "0.8")).factor.policy}
    _, report = compress(model, tmp_path / "api.onnx", min_params=0, **kwargs)
    assert _digest(tmp_path / "cli.onnx") == _digest(tmp_path / "api.onnx")
    assert (report.budget is not None) == with_data
    assert ("feeds a graph output" in report.layers[-1].reason) != with_data  # the head: dense without data only
    capsys.readouterr()


def test_the_rules_decide_what_is_left_open(tmp_path: Path) -> None:
    model = load_model(MODELS / "digits_mlp.onnx")
    nothing = decide(CompressOptions(), model)
    assert nothing.budget is None and nothing.factor.method == "svd" and nothing.factor.factor_heads is False
    labelled = decide(CompressOptions(data=DataOptions(data=MODELS / "digits_test.npz")), model)
    assert labelled.budget == Budget(max_drop=1.0) and labelled.factor.method == "whitened"
    assert labelled.factor.factor_heads is True
    with np.load(MODELS / "digits_test.npz") as archive:
        unlabelled = {"input": archive["input"]}
    decided = decide(CompressOptions(data=DataOptions(data=unlabelled), budget=Budget(holdout=0.3)), model)
    assert decided.budget == Budget(max_flips=0.005, holdout=0.3)  # the logits decide: their flips are counted
    chosen = decide(CompressOptions(data=DataOptions(data=unlabelled), factor=FactorOptions(policy=FixedRankPolicy(4))),
                    model)
    assert chosen.budget is None and chosen.factor.method == "svd"
    with pytest.raises(InvalidInputError, match="sequential refits apply under a budget"):
        decide(CompressOptions(budget=Budget(sequential=True), factor=FactorOptions(policy=FixedRankPolicy(4))), model)
    onnx.save(make_mlp(), tmp_path / "m.onnx")
    calibrated = CompressOptions(factor=FactorOptions(calibration=tmp_path / "c.npz"))
    heads = decide(calibrated, load_model(tmp_path / "m.onnx"))
    assert heads.factor.factor_heads is True  # calibration inputs are real inputs too
