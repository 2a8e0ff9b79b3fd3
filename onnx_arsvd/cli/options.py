"""CLI options generated from the option dataclasses' fields (:mod:`onnx_arsvd.config`), and read back into them.

A field's flag, help, kind and default come from the field itself, so a default lives in one place: the parser
leaves every generated option at ``None`` when it is not given, and the dataclass's own default applies. Names in
backticks in help texts and messages (`max_drop`) are shown as their flags (``--max-drop``).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import MISSING, Field, fields
from typing import Any

from onnx_arsvd.config import DataOptions, FactorOptions, LatencyGuard, OutputOptions
from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.fields import option_flag
from onnx_arsvd.numerics.rank import POLICIES, EnergyPolicy, EntropyPolicy, RankPolicy, make_policy
from onnx_arsvd.search.budget import Budget

__all__ = ["POLICY_PARAMS", "add_options", "as_flags", "embedding_policy", "given", "policy"]

POLICY_PARAMS = {"energy": "tau", "entropy": "scale", "rank": "rank", "ratio": "ratio"}
"""Each rank policy and the flag that sets its parameter."""

_HAND_MADE = {"policy": "--policy", "embedding_policy": "--embedding-tau",
              "progress": "--quiet", "budget": "--max-drop/--min-cosine/--target-params/--target-latency",
              "guard": "--guard", "quantize": "--quantize", "batch": "--batch", "output": "-o"}


def _flags() -> dict[str, str]:
    """Every option's flag, by field name."""
    flags = dict(_HAND_MADE)
    for cls in (FactorOptions, DataOptions, OutputOptions, Budget, LatencyGuard):
        for f in fields(cls):
            if f.metadata.get("cli"):
                flags.setdefault(f.name, option_flag(f.name, f.metadata))
    return flags


FLAGS = _flags()


def as_flags(text: str) -> str:
    """``text`` with each `field` shown as its flag (``--field``), other backticked names as plain words."""
    return re.sub(r"`([a-z_]+)`", lambda m: FLAGS.get(m.group(1), m.group(1)), text)


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def _help(f: Field) -> str:
    text = as_flags(f.metadata.get("help", ""))
    shown = f.metadata.get("default_text")
    if shown is None:
        default = _default(f)
        shown = ("" if default is None or f.metadata.get("kind") in ("switch", "off")
                 else ",".join(map(str, default)) if isinstance(default, tuple) else str(default))
    text = f"{text} (default: {as_flags(shown)})" if shown else text
    return text.replace("%", "%%")  # argparse formats help texts


def _value_type(f: Field) -> Any:
    """What turns the flag's text into the field's value."""
    if f.metadata.get("parse") is not None and f.metadata.get("kind") != "repeat":
        return f.metadata["parse"]
    default = _default(f)
    if isinstance(default, (int, float, str)) and not isinstance(default, bool):
        return type(default)
    annotation = str(f.type)
    return float if "float" in annotation else int if "int" in annotation else str


def add_options(parser: Any, cls: type, *, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()) -> None:
    """Add the CLI fields of ``cls`` (those in ``only``, when given, less ``skip``) to ``parser`` (or a group)."""
    for f in fields(cls):
        meta = f.metadata
        if not meta.get("cli") or f.name in skip or (only is not None and f.name not in only):
            continue
        flag, kind = option_flag(f.name, meta), meta.get("kind", "value")
        common: dict[str, Any] = {"dest": f.name, "default": None, "help": _help(f)}
        if kind == "switch":
            parser.add_argument(flag, action="store_true", **common)
        elif kind == "off":
            parser.add_argument(flag, action="store_const", const=False, **common)
        elif kind == "repeat":
            parser.add_argument(flag, action="append", metavar=meta.get("metavar"), **common)
        else:
            parser.add_argument(flag, type=_value_type(f), metavar=meta.get("metavar"), choices=meta.get("choices"),
                                **common)


def given(args: argparse.Namespace, cls: type, *, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (those in ``only``, when given), as the field's values."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        value = getattr(args, f.name, None)
        if value is None or not f.metadata.get("cli") or (only is not None and f.name not in only):
            continue
        if f.metadata.get("kind") == "repeat":
            value = tuple(value)
            parse = f.metadata.get("parse")
            value = parse(value) if parse is not None else value
        values[f.name] = value
    return values


def add_policy_options(parser: Any) -> None:
    """The rank policy and its parameter, and the embedding tables' threshold (made by :func:`policy`)."""
    names = ", ".join(sorted(POLICIES))
    parser.add_argument("--policy", help=f"the rank policy: {names} (default: {EnergyPolicy.name})")
    parser.add_argument("--tau", type=float, help="energy policy: share of the weight's energy sum(s^2) to keep, in "
                        f"(0, 1] (default: {EnergyPolicy().tau})")
    parser.add_argument("--output-tau", type=float, metavar="TAU",
                        help="energy policy with --method whitened: share of each layer's output energy on the "
                             "calibration inputs to keep (a different scale from --tau: 0.99 of the output energy is "
                             "often a far lower rank than 0.99 of the weight's)")
    parser.add_argument("--scale", type=float,
                        help=f"entropy policy: multiplier of the effective rank (default: {EntropyPolicy().scale:g})")
    parser.add_argument("--rank", type=int, help="rank policy: the rank of every layer")
    parser.add_argument("--ratio", type=float, help="ratio policy: rank = ratio * min(m, n), in (0, 1]")
    parser.add_argument("--embedding-tau", type=float, metavar="TAU",
                        help=_help(next(f for f in fields(FactorOptions) if f.name == "embedding_policy")))


def policy(args: argparse.Namespace) -> RankPolicy | None:
    """The rank policy the flags ask for, or None when none is given (the rules then decide)."""
    settings = [*POLICY_PARAMS.values(), "output_tau"]
    if args.policy is None and all(getattr(args, p) is None for p in settings):
        return None
    whitened = args.method == "whitened"
    if args.output_tau is not None and not whitened:
        raise InvalidInputError("--output-tau is a share of output energy: it needs --method whitened (else use --tau)")
    if whitened and args.tau is not None:
        raise InvalidInputError("with --method whitened the threshold is on each layer's output energy: "
                                "use --output-tau (--tau is a share of the weight's energy)")
    values = {**{p: getattr(args, p) for p in POLICY_PARAMS.values()},
              **({"tau": args.output_tau} if args.output_tau is not None else {})}
    given_params = [name for name, param in POLICY_PARAMS.items() if values[param] is not None]
    if args.policy is None and len(given_params) > 1:
        flags = ", ".join(f"--{POLICY_PARAMS[name]}" for name in given_params)
        raise InvalidInputError(f"{flags} set different rank policies: give one")
    name = args.policy or (given_params[0] if given_params else "energy")  # --ratio 0.3 alone: --policy ratio
    for other, other_param in POLICY_PARAMS.items():
        if other != name and values[other_param] is not None:
            raise InvalidInputError(f"--{other_param} does not apply to --policy {name}")
    own = POLICY_PARAMS.get(name)  # None for an unknown name: make_policy says so
    value = values.get(own) if own is not None else None
    return make_policy(name, **({own: value} if own is not None and value is not None else {}))


def embedding_policy(args: argparse.Namespace) -> RankPolicy | None:
    return EnergyPolicy(args.embedding_tau) if args.embedding_tau is not None else None
