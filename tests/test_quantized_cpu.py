"""Quantized products on the CPU: few rows through MLX's quantized kernel (in float32), many rows
through the dequantized weight and the float GEMM; the same numbers either way."""

import re
from collections import Counter

import mlx.core as mx
import mlx.nn as nn
import pytest

import mlx_gemma3n
from mlx_gemma3n.convert import convert
from mlx_gemma3n.model import quantized
from mlx_gemma3n.model.quantized import DEQUANTIZE_FROM_ROWS, QuantizedLinear, dequantizes, quantized_matmul

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU back-end's paths")

FEW, MANY = DEQUANTIZE_FROM_ROWS - 1, DEQUANTIZE_FROM_ROWS


def primitives(tmp_path, *outputs) -> Counter:
    """The primitives that computing `outputs` runs (inputs already evaluated)."""
    dot = tmp_path / "graph.dot"
    mx.export_to_dot(str(dot), *outputs)
    return Counter(re.findall(r'label ="(\w+)"', dot.read_text()))


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """How often each CPU path runs: the blocks the float GEMM dequantizes, the kernel's products.
    (The float GEMM evaluates each block as it goes, so the lazy graph no longer shows them.)"""
    counts = Counter()
    for name in ("dequantize_f32", "kernel_product_f32"):
        real = getattr(quantized, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(quantized, name, counted)
    return counts


def layer_pair(in_dims, out_dims, bits, group_size, bias=False, seed=0):
    """Ours and MLX's quantized layer over the same quantized weight."""
    mx.random.seed(seed)
    linear = nn.Linear(in_dims, out_dims, bias=bias)
    if bias:
        linear.bias = mx.random.normal((out_dims,))
    ours = QuantizedLinear.from_linear(linear, group_size=group_size, bits=bits)
    theirs = nn.QuantizedLinear.from_linear(linear, group_size=group_size, bits=bits)
    mx.eval(ours.parameters(), theirs.parameters())
    return ours, theirs


def relative_error(ours, theirs) -> float:
    ours, theirs = ours.astype(mx.float32), theirs.astype(mx.float32)
    return (mx.abs(ours - theirs).max() / mx.abs(theirs).max()).item()


@pytest.mark.parametrize("rows", [1, FEW, MANY, 37])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [64, 128])
def test_equals_mlx_quantized_linear_in_float32(rows, bits, group_size):
    ours, theirs = layer_pair(512, 96, bits, group_size)
    x = mx.random.normal((rows, 512))
    error = relative_error(ours(x), theirs(x))
    assert error <= 1e-5, f"{rows} rows, {bits} bits, group size {group_size}: relative error {error:.2e}"


@pytest.mark.parametrize("bits", [2, 3, 6])
def test_other_widths_equal_mlx_quantized_linear(bits):
    ours, theirs = layer_pair(256, 48, bits, 64)
    for rows in (1, MANY):
        x = mx.random.normal((rows, 256))
        assert relative_error(ours(x), theirs(x)) <= 1e-5, f"{bits} bits, {rows} rows"


def test_weights_split_into_blocks_give_the_same_product(monkeypatch, calls):
    ours, theirs = layer_pair(256, 100, 4, 64)
    x = mx.random.normal((2, 8, 256))
    whole = ours(x)
    monkeypatch.setattr(quantized, "BLOCK_WEIGHTS", 256 * 7)  # blocks of 7 rows, the last one short
    calls.clear()
    blocked = ours(x)
    assert calls["dequantize_f32"] == 15
    assert relative_error(blocked, whole) <= 1e-6
    assert relative_error(blocked, theirs(x)) <= 1e-5


def test_bias_is_added():
    ours, theirs = layer_pair(256, 32, 4, 64, bias=True)
    for rows in (1, MANY):
        x = mx.random.normal((rows, 256))
        assert relative_error(ours(x), theirs(x)) <= 1e-5


def test_serves_a_quantized_embedding_as_the_tied_output_head():
    table = nn.QuantizedEmbedding.from_embedding(nn.Embedding(300, 128), group_size=64, bits=4)
    for rows in (1, MANY):
        x = mx.random.normal((1, rows, 128))
        assert relative_error(quantized_matmul(x, table), table.as_linear(x)) <= 1e-5


@pytest.mark.parametrize("rows", [1, MANY])
def test_bfloat16_in_gives_the_float32_product_rounded_to_bfloat16(rows):
    ours, _ = layer_pair(512, 64, 4, 64)
    ours.set_dtype(mx.bfloat16)  # scales and biases, as a bfloat16 load has them
    x = mx.random.normal((rows, 512)).astype(mx.bfloat16)
    w = mx.dequantize(ours.weight, ours.scales.astype(mx.float32), ours.biases.astype(mx.float32),
                      group_size=64, bits=4)
    y = ours(x)
    assert y.dtype == mx.bfloat16
    assert relative_error(y, x.astype(mx.float32) @ w.T) <= 2**-8


def test_a_large_product_casts_its_16_bit_scales_a_block_of_rows_at_a_time(monkeypatch):
    ours, _ = layer_pair(512, 16384, 4, 64)
    ours.set_dtype(mx.bfloat16)
    x = mx.random.normal((1, 512)).astype(mx.bfloat16)
    whole = quantized_matmul(x, ours)  # the float32 scales and biases: 1 MB, under CAST_BYTES
    mx.eval(x, whole)
    monkeypatch.setattr(quantized, "CAST_BYTES", 2048 * 8 * 8)  # blocks of 2048 rows (8 groups each)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    blocked = quantized_matmul(x, ours)
    mx.eval(blocked)
    assert mx.array_equal(blocked, whole)
    whole_cast = 2 * 16384 * 8 * 4
    assert mx.get_peak_memory() - before < whole_cast / 2


def test_the_row_count_picks_the_path(tmp_path, calls):
    ours, _ = layer_pair(256, 64, 4, 64)
    few, many = mx.random.normal((1, FEW, 256)), mx.random.normal((2, MANY // 2 + 1, 256))
    mx.eval(few, many)
    assert not dequantizes(few) and dequantizes(many)
    assert primitives(tmp_path, ours(few))["QuantizedMatmul"] == 1
    assert calls == {"kernel_product_f32": 1}
    calls.clear()
    ours(many)
    assert calls == {"dequantize_f32": 1}


# ----------------------------------------------------------------------------- loaded checkpoints

@pytest.fixture(scope="module")
def q4(tiny, tmp_path_factory):
    return convert(tiny[0], tmp_path_factory.mktemp("conv") / "q4", quantize=True, bits=4, group_size=32,
                   show_progress=False)


@pytest.fixture(scope="module")
def q4_model(q4):
    return mlx_gemma3n.load(q4, dtype=mx.float32)[0]


def test_a_loaded_quantized_checkpoint_uses_our_linear_layers(q4_model):
    kinds = Counter(type(m) for _, m in q4_model.language_model.named_modules())
    assert kinds[QuantizedLinear] > 0
    assert kinds[nn.QuantizedLinear] == 0 and kinds[nn.Linear] > 0  # the narrow ones stay float


def test_decoding_uses_the_quantized_kernel_and_a_prompt_chunk_the_float_gemm(q4_model, calls):
    language_model = q4_model.language_model
    cache = q4_model.make_cache()
    prompt = mx.array([[2, 105, 2364, 107, 9259, 563, 496, 1029]])
    embeddings = q4_model.embed(prompt)
    mx.eval(embeddings)
    mx.eval(language_model(prompt, cache, embeddings))
    chunk = Counter(calls)
    calls.clear()
    token = mx.array([[1029]])
    embedding = q4_model.embed(token)
    mx.eval(embedding)
    mx.eval(language_model(token, cache, embedding))
    # Each quantized layer the step runs through its kernel, the chunk dequantizes (in one block here).
    assert calls["kernel_product_f32"] > 0 and calls["dequantize_f32"] == 0
    assert chunk["kernel_product_f32"] == 0 and chunk["dequantize_f32"] == calls["kernel_product_f32"]


def test_a_prompt_in_one_chunk_gives_the_logits_of_one_token_at_a_time(q4_model):
    prompt = mx.array([[2, 105, 2364, 107, 9259, 563, 496, 1029]])
    chunked = q4_model(prompt, cache=q4_model.make_cache())[:, -1]
    cache = q4_model.make_cache()
    for i in range(prompt.shape[1]):
        stepwise = q4_model(prompt[:, i : i + 1], cache=cache)[:, -1]
    error = relative_error(chunked, stepwise)
    assert error <= 1e-4, f"relative difference of the last logits {error:.2e}"
