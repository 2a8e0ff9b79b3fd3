"""The graph patterns of the real transformers users bring, from tiny randomly initialised models of the same
architectures exported in the test: a Llama-style decoder (RMSNorm, SwiGLU, grouped-query attention, RoPE, a
vocabulary head) and an MPNet-style encoder (relative position bias, GELU FFN). Matching, width units and a
budgeted run are checked on every push; the real models are benchmark extras (``models/build_mpnet.py``,
``models/build_smollm2.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnx_arsvd import compress
from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.methods.width.find import find_width_units
from onnx_arsvd.search.budget import Budget

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, FFN, BLOCKS = 256, 64, 160, 2


class _Logits(torch.nn.Module):
    """Keyword inputs in, one tensor out, as the export wants."""

    def __init__(self, model: torch.nn.Module, output: str) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), self.output)


def _export(model: torch.nn.Module, output: str, path: Path) -> Path:
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    torch.onnx.export(_Logits(model, output), (ids, torch.ones_like(ids)), str(path), dynamo=False,
                      opset_version=17, input_names=["input_ids", "attention_mask"], output_names=[output],
                      dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                    "attention_mask": {0: "batch", 1: "sequence"}, output: {0: "batch", 1: "sequence"}})
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                      num_hidden_layers=BLOCKS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=True,
                                      use_cache=False)
    return _export(transformers.LlamaForCausalLM(config), "logits", tmp_path_factory.mktemp("llama") / "llama.onnx")


@pytest.fixture(scope="module")
def mpnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.MPNetConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                      num_hidden_layers=BLOCKS, num_attention_heads=4, max_position_embeddings=64)
    return _export(transformers.MPNetModel(config), "last_hidden_state",
                   tmp_path_factory.mktemp("mpnet") / "mpnet.onnx")


def _tokens(n: int = 48, length: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((n, length), dtype=np.int64)
    mask[n // 2:, length - 3:] = 0  # some padded rows
    return {"input_ids": rng.integers(3, VOCAB, size=(n, length)).astype(np.int64), "attention_mask": mask}


def test_llama_layers_and_swiglu_units_are_found(llama: Path) -> None:
    layers, _ = find_layers(ir.load(llama))
    products = [layer for layer in layers if not layer.is_embedding]
    # per block q, k, v, o, gate, up, down; then the vocabulary head (tied to the table, exported apart)
    assert len(products) == 7 * BLOCKS + 1
    shapes = sorted({layer.shape for layer in products})
    assert (HIDDEN, HIDDEN // 2) in shapes  # grouped-query K and V: 2 of 4 heads' width
    assert (HIDDEN, VOCAB) in shapes
    units, refused = find_width_units(layers)
    assert len(units) == BLOCKS and all(len(u.entries) == 2 and u.width == FFN for u in units)
    # rotary embeddings and shared key/value heads: the heads are refused, each with its reason
    assert sum("not narrowed as heads" in r.reason for r in refused) == BLOCKS


def test_mpnet_gelu_units_are_found(mpnet: Path) -> None:
    units, refused = find_width_units(find_layers(ir.load(mpnet))[0])
    # the exporter passes MPNet's biases through Identity nodes: the exit's bias Add is not read as one (narrowing
    # then adds its own bias after the product), the entry's bias is a per-unit constant behind an Identity
    assert len(units) == BLOCKS and all(len(u.entries) == 1 and u.exit_bias is None for u in units)
    # q, k, v: their inputs come from a normalisation; o: the relative position bias is per head
    assert sum("broadcast over heads" in r.reason for r in refused) == BLOCKS


@pytest.mark.parametrize("name", ["llama", "mpnet"])
def test_a_budgeted_run_on_each_architecture_writes_a_verified_model(name: str, request: pytest.FixtureRequest,
                                                                      tmp_path: Path) -> None:
    source = request.getfixturevalue(name)
    out = tmp_path / "small.onnx"
    _, report = compress(source, out, data=_tokens(), budget=Budget(target_params=0.7))
    assert out.exists() and report.verification is not None
    assert report.dense_params_after <= 0.7 * report.dense_params_before
    assert report.factored + report.narrowed > 0
