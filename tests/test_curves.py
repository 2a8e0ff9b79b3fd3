"""Curves of a real model's layers, allocations back as plans, and measured layer sensitivities."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.io.data import load_data, split_batches
from onnx_arsvd.io.models import load_model, to_model
from onnx_arsvd.measure.calibration import capture_grams, output_errors
from onnx_arsvd.measure.sensitivity import Response, layer_responses, output_distortion
from onnx_arsvd.measure.sessions import make_session
from onnx_arsvd.methods.lowrank.curves import allocation_plans, weight_curves, weight_options
from onnx_arsvd.methods.lowrank.rewrite import apply_plans
from onnx_arsvd.methods.lowrank.sequential import sequential_factors
from onnx_arsvd.numerics.allocate import DENSE, Allocation
from onnx_arsvd.numerics.rank import break_even_rank
from onnx_arsvd.search.parts import split_data
from tests.conftest import MODELS

FASHION = MODELS / "fashion_mlp.onnx"


@pytest.fixture(scope="module")
def fashion() -> tuple[list, list, dict]:
    """Curves of the Fashion MLP's three layers from 1,000 test images, and those images' batches."""
    with np.load(MODELS / "fashion_test.npz") as archive:
        calibration, _ = split_data({"input": archive["input"][:1000]}, 0.4, 0)
    model = load_model(FASHION)
    layers = find_layers(model)[0]
    curves = weight_curves(layers, capture_grams(model, layers, calibration))
    session = make_session(FASHION)
    batches = list(split_batches(load_data(calibration, session)[0], session, 256))
    return curves, batches, calibration


def test_plans_of_an_allocation_rebuild_the_predicted_layer_errors(fashion) -> None:
    curves, _, calibration = fashion
    allocation = Allocation({curves[0].key: 40, curves[1].key: 24, curves[2].key: DENSE}, 0.0, 0.0)
    model = load_model(FASHION)
    layers = find_layers(model)[0]
    plans = allocation_plans(layers, curves, allocation)
    assert [p.factored for p in plans] == [True, True, False]
    assert "too small" in plans[2].decisions[0].reason and plans[2].rank == 10
    errors = output_errors(model, layers, {plan.layers[0].weight_key: plan.factors for plan in plans[:2]},
                           calibration)
    assert set(errors) == {curve.key for curve in curves[:2]}
    for plan, curve in zip(plans[:2], curves[:2], strict=True):
        measured = errors[curve.key]  # measured on the activations themselves, batch by batch
        assert measured == pytest.approx(np.sqrt(curve.curve.relative()[plan.rank]), rel=1e-6)
        assert plan.decisions[0].predicted_error == pytest.approx(measured, rel=1e-6)
    assert apply_plans(model, plans) == 2


def test_options_map_each_layer_through_its_response(fashion) -> None:
    curves = fashion[0]
    plain = weight_options(curves)
    scaled = weight_options(curves, responses={curves[0].key: Response(3.0, 2.0)})
    assert scaled[0].choices[0][1] == pytest.approx(3.0 * plain[0].choices[0][1] ** 2)
    assert scaled[1].choices == plain[1].choices and plain[2].ranks == (DENSE,)  # the 2,560-weight head: too small


@pytest.mark.parametrize("tau", [0.99, 0.995])
def test_responses_predict_the_end_to_end_distortion_of_a_combined_allocation(fashion, tau: float) -> None:
    """The model's relative squared output error is taken as the sum of the layers' responses to their
    own errors, each measured with that layer alone factored. With both layers factored at once, on
    real images, the sum agrees with the measurement within a factor 1.5 (the errors interact a little)."""
    curves, batches, _ = fashion
    responses = layer_responses(FASHION, curves[:2], batches)
    assert all(r.scale > 0 and 0.5 <= r.power <= 2.0 for r in responses.values())
    ranks = {c.key: int(np.searchsorted(1 - c.curve.relative(), tau)) for c in curves[:2]}
    candidate = to_model(FASHION)
    apply_plans(candidate, allocation_plans(find_layers(candidate)[0], curves, Allocation(ranks, 0.0, 0.0)))
    original, compressed = make_session(FASHION), make_session(ir.to_proto(candidate).SerializeToString())
    measured = output_distortion([original.run(None, b) for b in batches], [compressed.run(None, b) for b in batches])
    predicted = sum(float(responses[c.key](c.curve.relative()[ranks[c.key]])) for c in curves[:2])
    assert 0.0 < measured and 1 / 1.5 < predicted / measured < 1.5


def test_sequential_refit_lowers_the_calibration_error_of_an_allocation(fashion) -> None:
    """Refitting layer by layer on the partially compressed model's inputs absorbs part of the first
    layer's error in the second: the model's output error on the calibration images drops (measured
    0.012 -> 0.002 relative squared error at ranks 24/24, on 600 images: an optimistic figure, since the
    refit is fitted on them; held out, on the full split, 0.0146 -> 0.0068). The factored shapes stay the same."""
    curves, batches, _ = fashion
    allocation = Allocation({curves[0].key: 24, curves[1].key: 24, curves[2].key: DENSE}, 0.0, 0.0)
    refitted = sequential_factors(load_model(FASHION), curves, allocation, batches)
    assert set(refitted) == {curves[0].key, curves[1].key}
    assert [f.shape for f in refitted[curves[1].key]] == [(512, 24), (24, 256)]
    original = make_session(FASHION)
    reference = [original.run(None, b) for b in batches]
    distortion = {}
    for name, factors in (("one-shot", None), ("sequential", refitted)):
        candidate = to_model(FASHION)
        apply_plans(candidate, allocation_plans(find_layers(candidate)[0], curves, allocation, factors=factors))
        session = make_session(ir.to_proto(candidate).SerializeToString())
        distortion[name] = output_distortion(reference, [session.run(None, b) for b in batches])
    assert distortion["sequential"] < 0.8 * distortion["one-shot"]


def test_curves_are_the_same_whatever_the_jobs_and_release_their_grams(fashion) -> None:
    curves, _, calibration = fashion
    model = load_model(FASHION)
    layers = find_layers(model)[0]
    grams = capture_grams(model, layers, calibration)
    parallel = weight_curves(layers, grams, jobs=2, release=True)
    assert grams == {}  # released as the curves were made: the search holds either, not both
    assert [c.key for c in parallel] == [c.key for c in curves]
    for one, two in zip(curves, parallel, strict=True):
        np.testing.assert_array_equal(one.curve.losses, two.curve.losses)
        np.testing.assert_array_equal(one.curve.basis, two.curve.basis)


def test_responses_take_the_first_samples_holding_enough_output_values(fashion) -> None:
    """10 logits per image: 2**20 values need every calibration image here; a small value count keeps the
    32-sample floor, cut inside a batch; the cut batches are the first rows, in order."""
    from onnx_arsvd.search.parts import first_samples, response_batches

    _, batches, _ = fashion
    session = make_session(FASHION)
    every = response_batches(session, batches)
    assert all(np.array_equal(a["input"], b["input"]) for a, b in zip(every, batches, strict=True))
    few = response_batches(session, batches, values=100)
    assert [len(b["input"]) for b in few] == [32] and np.array_equal(few[0]["input"], batches[0]["input"][:32])
    across = first_samples(batches, 300)
    assert [len(b["input"]) for b in across] == [256, 44]
    assert np.array_equal(across[1]["input"], batches[1]["input"][:44])
    assert first_samples(batches, 0) == [] and first_samples([], 5) == []


def test_a_search_stores_only_the_factors_of_the_ranks_it_may_choose(fashion) -> None:
    """With the allocation's rank limit (0.8 x break-even) each curve keeps that many factor columns, the
    same as the full curve's, and the losses of every rank: 247 of 512 columns for the 784 x 512 weight."""
    curves, _, calibration = fashion
    model = load_model(FASHION)
    layers = find_layers(model)[0]
    kept = weight_curves(layers, capture_grams(model, layers, calibration), max_rank_fraction=0.8)
    assert [c.curve.stored_rank for c in kept] == [247, 136, 7]
    assert [c.curve.stored_rank for c in curves] == [512, 256, 10]
    for full, few in zip(curves, kept, strict=True):
        np.testing.assert_array_equal(full.curve.losses, few.curve.losses)
        k = few.curve.stored_rank
        for one, two in zip(full.curve.factors(k), few.curve.factors(k), strict=True):
            np.testing.assert_array_equal(one, two)
        with pytest.raises(ValueError, match=rf"rank must be in \[1, {k}\] \(the factors stored\)"):
            few.curve.factors(k + 1)
    stored = sum(c.curve.projected.nbytes + c.curve.basis.nbytes for c in kept)
    assert stored < 0.5 * sum(c.curve.projected.nbytes + c.curve.basis.nbytes for c in curves)
    # the layer responses probe the rank nearest a relative error of 0.01: kept too, beyond the limit if need be
    probed = weight_curves(layers, capture_grams(model, layers, calibration), max_rank_fraction=0.8,
                           probes=(0.01, 0.1))
    for full, few in zip(curves, probed, strict=True):
        assert few.curve.stored_rank == max(int(0.8 * break_even_rank(full.curve.shape)),
                                            full.curve.rank_nearest(0.01), full.curve.rank_nearest(0.1))
    exact = weight_curves(layers, capture_grams(model, layers, calibration), max_rank_fraction=0.8, probes=(0.0,))
    assert [c.curve.stored_rank for c in exact] == [512, 256, 10]  # a probe beyond the limit is kept all the same
