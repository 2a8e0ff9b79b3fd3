"""Loss curves: the predicted output error at every rank against the error measured on real activations."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.io.models import load_model
from onnx_arsvd.measure.calibration import capture_grams, curve_grams
from onnx_arsvd.numerics.factorize import factors_at_rank, spectrum
from onnx_arsvd.numerics.losscurve import OutputGram, loss_curve
from tests.conftest import MODELS, random_weight, run


def real_layer(name: str, index: int, samples: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W as X @ W uses it, the layer's real input activations X, the Gram that calibration captures)."""
    path = MODELS / f"{name}_mlp.onnx"
    with np.load(MODELS / f"{name}_test.npz") as archive:
        feed = {"input": archive["input"][:samples]}
    model = load_model(path)
    layer = find_layers(model)[0][index]
    gram = capture_grams(model, [layer], feed)[layer.weight_key]
    proto = onnx.load(path)
    del proto.graph.output[:]
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(layer.node.inputs[0].name))
    feed = {proto.graph.input[0].name: feed["input"].astype(_input_dtype(proto))}
    x = run(proto, feed)[0].astype(np.float64)
    return layer.matrix().astype(np.float64), x, gram


def _input_dtype(proto: onnx.ModelProto) -> np.dtype:
    return onnx.helper.tensor_dtype_to_np_dtype(proto.graph.input[0].type.tensor_type.elem_type)


@pytest.mark.parametrize(("name", "index"), [("fashion", 0), ("fashion", 1), ("digits", 0)])
def test_curve_equals_the_error_measured_on_real_activations(name: str, index: int) -> None:
    """Covers m > n (Fashion 784 x 512, 512 x 256) and m < n (digits 64 x 256, an up-projection)."""
    weight, x, gram = real_layer(name, index)
    assert np.allclose(gram, x.T @ x, rtol=1e-9, atol=1e-9 * np.abs(gram).max())
    curve = loss_curve(weight, gram)
    assert curve.max_rank == min(weight.shape) and curve.energy == pytest.approx(np.sum((x @ weight) ** 2), rel=1e-9)
    for rank in (1, 5, 17, curve.max_rank // 2, curve.max_rank - 3):
        a, b = curve.factors(rank)
        measured = float(np.sum((x @ weight - x @ a @ b) ** 2))
        # float64 sums over a few hundred samples: agreement to 1e-7 of the output energy
        assert curve.losses[rank] == pytest.approx(measured, rel=1e-6, abs=1e-7 * curve.energy)


@pytest.mark.parametrize(("name", "index"), [("fashion", 0), ("fashion", 1), ("digits", 0)])
def test_curve_grams_keep_the_smaller_side_and_give_the_same_curve(name: str, index: int) -> None:
    """A tall weight (Fashion 784 x 512, 512 x 256) gets its n x n output Gram, a wide one (digits 64 x 256) its
    input Gram; the curves equal those from the input Gram to float64 rounding, and the factors to float32's."""
    weight, x, gram = real_layer(name, index)
    model = load_model(MODELS / f"{name}_mlp.onnx")
    layer = find_layers(model)[0][index]
    with np.load(MODELS / f"{name}_test.npz") as archive:
        small = curve_grams(model, [layer], {"input": archive["input"][:300]})[layer.weight_key]
    m, n = weight.shape
    if m > n:
        assert isinstance(small, OutputGram) and small.matrix.shape == (n, n)
        assert np.allclose(small.matrix, weight.T @ gram @ weight, rtol=1e-9, atol=1e-9 * np.abs(small.matrix).max())
    else:
        assert isinstance(small, np.ndarray) and small.shape == (m, m)
    one, two = loss_curve(weight, gram), loss_curve(weight, small)
    np.testing.assert_allclose(two.losses, one.losses, rtol=1e-6, atol=1e-9 * one.energy)
    a1, b1 = one.factors(17)
    a2, b2 = two.factors(17)
    np.testing.assert_allclose(a2 @ b2, a1 @ b1, atol=1e-4 * np.abs(a1 @ b1).max())



def test_an_output_gram_must_fit_a_tall_weight() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        loss_curve(np.ones((5, 3)), OutputGram(np.eye(4), 1.0, 5))
    with pytest.raises(ValueError, match="more columns than rows"):
        loss_curve(np.ones((3, 5)), OutputGram(np.eye(5), 1.0, 3))


@pytest.mark.parametrize(("name", "index"), [("fashion", 0), ("digits", 0)])
def test_curve_is_never_worse_than_plain_svd_on_the_outputs(name: str, index: int) -> None:
    weight, x, gram = real_layer(name, index)
    curve, spec = loss_curve(weight, gram), spectrum(weight)
    better = 0
    for rank in range(1, curve.max_rank, 7):
        a, b = factors_at_rank(spec, rank)
        svd_loss = float(np.sum((x @ weight - x @ a @ b) ** 2))
        assert curve.losses[rank] <= svd_loss * (1 + 1e-6) + 1e-9 * curve.energy  # the ridge's slack only
        better += curve.losses[rank] < 0.9 * svd_loss
    assert better >= 3  # and strictly better where it matters: real activations are far from isotropic


def test_singular_gram_is_exact_at_full_rank() -> None:
    """Digits pixels that are always blank make the Gram singular: no failure, and the weight itself
    (not only its outputs on the calibration data) is reproduced at full rank."""
    weight, _, gram = real_layer("digits", 0)
    assert np.linalg.matrix_rank(gram) < gram.shape[0]
    curve = loss_curve(weight, gram)
    a, b = curve.factors(curve.max_rank)
    assert a.dtype == b.dtype == np.float32  # stored at the precision the factors are written in
    assert np.allclose(a @ b, weight, atol=1e-6 * np.abs(weight).max())  # float32 rounding, a few ulps
    assert curve.losses[-1] == pytest.approx(0.0, abs=1e-10 * curve.energy)
    assert np.all(np.diff(curve.losses) <= 0)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_both_branches_are_optimal_and_balanced(shape: tuple[int, int]) -> None:
    """Against the closed form: the best rank-k X W_k is the truncated SVD of X W (Eckart-Young)."""
    rng = np.random.default_rng(1)
    weight = random_weight(*shape, decay=0.1)
    x = rng.standard_normal((200, shape[0])) * np.linspace(0.1, 3.0, shape[0])
    curve = loss_curve(weight, x.T @ x, ridge=0.0)
    s = np.linalg.svd(x @ weight, compute_uv=False)
    tails = np.concatenate([np.cumsum((s**2)[::-1])[::-1], [0.0]])
    assert np.allclose(curve.losses, tails[: curve.max_rank + 1], atol=1e-9 * tails[0])
    a, b = curve.factors(6)
    assert np.allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1))


def test_rank_and_shape_are_checked() -> None:
    curve = loss_curve(np.eye(4), np.eye(4))
    with pytest.raises(ValueError, match="rank must be in"):
        curve.factors(0)
    with pytest.raises(ValueError, match="does not fit"):
        loss_curve(np.eye(4), np.eye(3))
    with pytest.raises(ValueError, match="keep must be at least 1"):
        curve.truncated(0)
    assert curve.truncated(9) is curve and curve.truncated(2).stored_rank == 2
