"""Planning on real graphs: the solver per weight, honest rank notes, and the same factors whatever --jobs is."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.methods.lowrank import plan
from onnx_arsvd.methods.lowrank.plan import plan_layers
from onnx_arsvd.numerics.rank import EnergyPolicy, RatioPolicy
from onnx_arsvd.numerics.threads import available_cores, job_count
from tests.conftest import make_mlp


@pytest.fixture(scope="module")
def big_layers() -> list:
    """An MLP whose two hidden weights are large enough for the randomized solvers."""
    return find_layers(ir.from_proto(make_mlp((1024, 768, 640, 10), decay=0.004)))[0]


@pytest.mark.parametrize("policy", [RatioPolicy(0.1), EnergyPolicy(0.6)], ids=str)
def test_factors_are_identical_whatever_the_jobs(big_layers: list, policy) -> None:
    one, two = (plan_layers(big_layers, policy, jobs=jobs) for jobs in (1, 2))
    assert [p.rank for p in one] == [p.rank for p in two]
    assert one[0].decisions[0].solver.split()[0] in {"randomized", "adaptive"}
    for a, b in zip(one, two, strict=True):
        assert (a.factors is None) == (b.factors is None)
        if a.factors is not None:
            assert all(x.tobytes() == y.tobytes() for x, y in zip(a.factors, b.factors, strict=True))


def test_a_rank_from_a_randomized_spectrum_says_how_far_it_may_be(big_layers: list) -> None:
    """The note's interval holds the exact energy rank, and the chosen rank is its upper end."""
    tau = 0.6
    for weight_plan in plan_layers(big_layers[:2], EnergyPolicy(tau)):
        decision = weight_plan.decisions[0]
        assert decision.solver.startswith("adaptive randomized")
        matrix = np.asarray(weight_plan.layers[0].weight.const_value.numpy(), dtype=np.float64)
        exact = EnergyPolicy(tau).choose(np.linalg.svd(matrix, compute_uv=False), matrix.shape)
        if decision.note:
            low, high = (int(x) for x in decision.note.split("[")[1].rstrip("]").split(", "))
            assert high == decision.rank and low <= exact <= high
        else:
            assert decision.rank == exact


def test_dense_layers_get_no_vectors_and_exact_ranks(big_layers: list) -> None:
    """A rank above the factoring limit needs no factors: LAPACK values only, so the rank shown is exact."""
    for weight_plan in plan_layers(big_layers[:2], EnergyPolicy(0.99)):
        decision = weight_plan.decisions[0]
        assert not decision.factored and weight_plan.factors is None
        assert "values only" in decision.solver and decision.note == ""


def test_an_unconverged_lp_fit_is_noted(monkeypatch: pytest.MonkeyPatch) -> None:
    layers = find_layers(ir.from_proto(make_mlp((96, 80, 10))))[0]
    monkeypatch.setattr(plan, "LP_MAX_ITER", 1)  # one reweighting step cannot reach the 1e-6 tolerance
    (first, _) = plan_layers(layers, RatioPolicy(0.1), lp_power=1.0)
    assert first.factored and "l_p fit stopped at its iteration cap (1 steps)" in first.decisions[0].note


def test_jobs_are_checked_and_capped_at_the_cores() -> None:
    assert job_count(10_000) == available_cores()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidInputError, match="jobs must be a positive integer"):
            job_count(bad)


def test_weights_from_external_data_are_unmapped_once_planned(tmp_path) -> None:
    """Each weight's memory map is closed after its plan, so a big model's pages do not pile up."""
    from onnx_arsvd.io.models import load_model

    path = tmp_path / "mlp.onnx"
    ir.save(ir.from_proto(make_mlp((96, 80, 64, 10))), path, external_data="mlp.onnx.data")
    model = load_model(path)
    layers = find_layers(model)[0]
    tensors = [layer.weight.const_value for layer in layers]
    assert all(isinstance(t, ir.ExternalTensor) for t in tensors)
    plans = plan_layers(layers, RatioPolicy(0.25), min_params=0)
    assert all(t.raw is None for t in tensors) and plans[0].factored
    assert tensors[0].numpy().shape == (96, 80)  # and a later read maps it again


def test_a_search_cache_keeps_every_singular_value_once_and_no_big_vectors(big_layers: list) -> None:
    """The budget search's memo: exact energy curves (no vectors of big weights); factors per step at its rank."""
    cache: dict = {}
    plan_layers(big_layers, EnergyPolicy(0.9), with_factors=False, cache=cache)
    big = big_layers[0].weight_key
    assert cache[big].exact and cache[big].u is None
    assert cache[big_layers[2].weight_key].u is not None  # 640 x 10: LAPACK, vectors kept
    first = cache[big]
    plans = plan_layers(big_layers, EnergyPolicy(0.5), cache=cache)
    assert cache[big] is first  # not decomposed again
    assert plans[0].rank == EnergyPolicy(0.5).choose(first.s, big_layers[0].shape) and plans[0].factors is not None
    assert plans[0].decisions[0].note == ""  # the rank came from the exact values


def test_compress_writes_the_same_bytes_whatever_the_jobs(tmp_path, capsys: pytest.CaptureFixture) -> None:
    """Through the CLI: --jobs 1 and --jobs 2 write byte-identical models (randomized solvers included)."""
    import onnx

    from onnx_arsvd.cli.main import main

    source = tmp_path / "mlp.onnx"
    onnx.save(make_mlp((1024, 768, 640, 10), decay=0.004), source)
    outputs = []
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}.onnx"
        assert main(["compress", str(source), "-o", str(out), "--policy", "ratio", "--ratio", "0.1", "--no-verify",
                     "-q", "--json", "--jobs", str(jobs)]) == 0
        outputs.append(out.read_bytes())
    report = capsys.readouterr().out
    assert '"solver": "randomized float32' in report
    assert outputs[0] == outputs[1]
    assert main(["compress", str(source), "-o", str(tmp_path / "bad.onnx"), "--jobs", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith("jobs must be a positive integer, got 0")
