"""A quantized KV cache (full-attention layers) keeps the model's outputs close to the float
cache's, holds bits/16 of the bytes, rewinds, and refuses widths it does not have."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma3n.cache import KVCache, QuantizedKV, QuantizedKVCache, SlidingWindowCache, attend
from mlx_gemma3n.errors import InputError
from mlx_gemma3n.loading import load_model

from checkpoints import make_checkpoint

PROMPT, CHUNK, DECODED = 40, 16, 20  # the prompt is five sliding windows of 8 long
# Worst over the prompt's last position and the decoded ones, measured: 8-bit KL 3.5e-4,
# |Δlogit| 0.14; 4-bit KL 0.09, |Δlogit| 1.9. A random model's flat next-token distribution
# (logits' spread ~1 over 262k tokens) feels the keys' rounding more than a trained one's.
TOLERANCES = {8: (1e-3, 0.3), 4: (0.3, 4.0)}  # bits: (KL, max |Δlogit|)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny checkpoint with 64-dim heads: MLX quantizes in groups of at least 32 dims."""
    path = tmp_path_factory.mktemp("tiny-kv-quant")
    make_checkpoint(path, {"head_dim": 64})
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    model, _ = load_model(checkpoint, dtype=mx.float32)
    return model


@pytest.fixture(scope="module")
def prompt():
    return np.random.RandomState(1).randint(0, 262_144, size=(1, PROMPT))


def run(model, cache, prompt, tokens=None):
    """Logits after the prompt (fed in chunks) and after each decoded token: greedy, or
    `tokens` fed instead so that two caches are compared on the same inputs. -> (logits, tokens)."""
    for start in range(0, PROMPT, CHUNK):
        logits = model(mx.array(prompt[:, start : start + CHUNK]), cache=cache)
    steps, fed = [logits[0, -1]], []
    for i in range(DECODED):
        fed.append(int(mx.argmax(steps[-1])) if tokens is None else tokens[i])
        steps.append(model(mx.array([[fed[-1]]]), cache=cache)[0, -1])
    return np.array(mx.stack(steps), dtype=np.float64), fed


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    log_p, log_q = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


@pytest.fixture(scope="module")
def float_run(model, prompt):
    return run(model, model.make_cache(), prompt)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_keeps_logits_close_to_the_float_cache(model, prompt, float_run, bits):
    reference, tokens = float_run
    logits, _ = run(model, model.make_cache(kv_bits=bits), prompt, tokens)
    max_kl, max_diff = kl(reference, logits).max(), np.abs(reference - logits).max()
    print(f"{bits}-bit: KL {max_kl:.2e}, max |Δlogit| {max_diff:.3f}")
    assert max_diff > 0, "the quantized cache changed nothing: is it in use?"
    assert max_kl < TOLERANCES[bits][0] and max_diff < TOLERANCES[bits][1], f"KL {max_kl:.2e}, |Δ| {max_diff:.3f}"


def test_8_bit_cache_decodes_the_same_greedy_tokens(model, prompt, float_run):
    _, expected = float_run
    _, tokens = run(model, model.make_cache(kv_bits=8), prompt)
    assert tokens == expected


def test_only_full_attention_layers_are_quantized(model):
    quantized = {KVCache: QuantizedKVCache, SlidingWindowCache: SlidingWindowCache}
    assert [type(c) for c in model.make_cache(kv_bits=4)] == [quantized[type(c)] for c in model.make_cache()]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_quantized_cache_holds_bits_over_16_of_the_float_bytes(bits, dtype):
    keys = mx.random.normal((1, 2, 300, 256)).astype(dtype)
    quantized, plain = QuantizedKVCache(bits), KVCache()
    quantized.update_and_fetch(keys, keys)
    plain.update_and_fetch(keys, keys)
    bits_per_value = bits + 2 * 16 / 64  # and a 16-bit scale and bias per group of 64
    assert quantized.nbytes / plain.nbytes == pytest.approx(bits_per_value / 16)


def test_decode_through_the_quantized_kernel_equals_attention_over_the_dequantized_cache():
    cache = QuantizedKVCache(8)
    keys, values = cache.update_and_fetch(*mx.random.normal((2, 1, 2, 100, 64)))
    queries = mx.random.normal((1, 8, 1, 64))  # four query heads to each key/value head
    expected = mx.fast.scaled_dot_product_attention(queries, keys.dequantize(mx.float32),
                                                    values.dequantize(mx.float32), scale=0.5, mask=None)
    assert np.abs(np.array(attend(queries, keys, values, scale=0.5, mask=None) - expected)).max() < 1e-5


def test_prompt_chunks_attend_over_a_long_quantized_cache_in_blocks_alike(model, prompt, monkeypatch):
    """On the CPU, chunks over more than KEY_BLOCK positions take the blockwise softmax: the same
    logits as attention over the whole dequantized cache."""
    from mlx_gemma3n import cache as caches

    whole, tokens = run(model, model.make_cache(kv_bits=8), prompt)
    monkeypatch.setattr(caches, "KEY_BLOCK", 12)
    blocked, same_tokens = run(model, model.make_cache(kv_bits=8), prompt)
    assert same_tokens == tokens
    # Attention itself agrees to ~1e-6; the random model amplifies that over 20 layers and 20
    # tokens (measured: 2e-5 with the reference BLAS, 4e-3 with OpenBLAS; logits' scale ~5).
    assert np.abs(blocked - whole).max() < 1e-2


@pytest.mark.parametrize("bits", [8, None])
def test_reserved_room_takes_a_long_prompt_in_one_allocation(model, prompt, monkeypatch, bits):
    from mlx_gemma3n.cache import reserve

    monkeypatch.setattr(QuantizedKVCache if bits else KVCache, "step", 8)  # each chunk of 16 would regrow it
    cache, plain = model.make_cache(kv_bits=bits), model.make_cache(kv_bits=bits)
    reserve(cache, PROMPT + DECODED)
    full = [c for c in cache if not isinstance(c, SlidingWindowCache)]
    capacities, plain_capacities = set(), set()
    for start in range(0, PROMPT, CHUNK):
        logits = model(mx.array(prompt[:, start : start + CHUNK]), cache=cache)
        expected = model(mx.array(prompt[:, start : start + CHUNK]), cache=plain)
        assert mx.array_equal(logits, expected).item()
        capacities |= {c.state[0].shape[2] for c in full}
        plain_capacities |= {c.state[0].shape[2] for c in plain if not isinstance(c, SlidingWindowCache)}
    assert capacities == {-(-(PROMPT + DECODED) // 8) * 8}  # allocated once (in whole steps), written in place
    assert plain_capacities == {16, 32, 40}


def test_trimmed_cache_continues_as_if_the_trimmed_tokens_never_came(model, prompt):
    ids = mx.array(prompt)
    rewound = model.make_cache(kv_bits=8)
    model(ids[:, :30], cache=rewound)
    assert all(c.can_trim(5) for c in rewound)
    for c in rewound:
        c.trim(5)
    fresh = model.make_cache(kv_bits=8)
    model(ids[:, :25], cache=fresh)
    continued = [np.array(model(ids[:, 25:30], cache=c)) for c in (rewound, fresh)]
    assert np.abs(continued[0] - continued[1]).max() < 1e-5


def test_kv_shared_layers_attend_over_exactly_what_their_source_layer_did(model, prompt, monkeypatch):
    import mlx_gemma3n.model.text as text

    seen = []

    def spy(queries, keys, values, scale, mask):
        if isinstance(keys, QuantizedKV):
            seen.append((keys, values))
        return attend(queries, keys, values, scale, mask)

    monkeypatch.setattr(text, "attend", spy)
    model(mx.array(prompt[:, :CHUNK]), cache=model.make_cache(kv_bits=8))
    # The tiny model's full-attention layers: 2 (cached), and 5 and 7, which share layer 2's.
    assert len(seen) == 3 and all(kv[0] is seen[0][0] and kv[1] is seen[0][1] for kv in seen)


@pytest.mark.parametrize("bits", [3, 16, "8", 8.0, True])
def test_a_width_the_cache_does_not_have_is_an_input_error(model, bits):
    with pytest.raises(InputError, match="kv_bits") as error:
        model.make_cache(kv_bits=bits)
    assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")


def test_replies_and_chats_take_kv_bits(checkpoint):
    from mlx_gemma3n import ChatSession, InputError, SamplingOptions, generate, load

    model, tokenizer = load(checkpoint, dtype=mx.float32)
    reply = generate(model, tokenizer, "hello world", kv_bits=8, temperature=0.0, max_tokens=4)
    assert reply == generate(model, tokenizer, "hello world", temperature=0.0, max_tokens=4)  # a short context
    chat = ChatSession(model, tokenizer, sampling=SamplingOptions(temperature=0.0), kv_bits=4)
    assert len(list(chat.send("the cat", max_tokens=3))) == 3
    assert {type(c).__name__ for c in chat.cache} >= {"QuantizedKVCache"}
    with pytest.raises(InputError):
        generate(model, tokenizer, "hello world", kv_bits=3)


def test_a_reply_makes_room_for_its_prompt_and_tokens_at_once(checkpoint, prompt, monkeypatch):
    from mlx_gemma3n import SamplingOptions, load
    from mlx_gemma3n.runtime.generation import stream_tokens

    monkeypatch.setattr(KVCache, "step", 8)  # unreserved, each prompt chunk would regrow the cache
    model, tokenizer = load(checkpoint, dtype=mx.float32)
    cache = model.make_cache()
    ids = prompt[0].tolist()
    replies = list(stream_tokens(model, tokenizer, ids, max_tokens=5, prompt_cache=cache, prefill_step_size=CHUNK,
                                 sampling=SamplingOptions(temperature=0.0)))
    assert len(replies) == 5
    full = [c for c in cache if isinstance(c, KVCache)]
    assert full and {c.keys.shape[2] for c in full} == {-(-(PROMPT + 5) // 8) * 8}  # in whole steps


@pytest.mark.parametrize("bits", [8, 4])
def test_the_compiled_decode_step_continues_a_quantized_cache_as_op_by_op(model, prompt, bits, monkeypatch):
    from mlx_gemma3n.model.text import TextModel

    by_op, compiled = model.make_cache(kv_bits=bits), model.make_cache(kv_bits=bits)
    logits = model(mx.array(prompt), cache=by_op)
    model(mx.array(prompt), cache=compiled)
    traced, decoder = [], TextModel.__call__

    def counted(self, ids=None, cache=None, *args, **kwargs):
        if cache is not by_op:
            traced.append(1)
        return decoder(self, ids, cache, *args, **kwargs)

    monkeypatch.setattr(TextModel, "__call__", counted)
    for step in range(DECODED):
        token = mx.argmax(logits[:, -1], axis=-1)[:, None]
        logits = model(token, cache=by_op)
        theirs = model.decode(token, compiled)
        worst = np.abs(np.array(logits) - np.array(theirs)).max()
        assert worst <= 1e-4, f"decoded token {step}: max |Δlogit| {worst:.2e}"
    assert len(traced) <= 3  # once op by op (a plan's first call, at most), once traced, once retraced
    assert [c.offset for c in compiled] == [c.offset for c in by_op] == [PROMPT + DECODED] * len(by_op)
    for a, b in zip(by_op, compiled):
        if isinstance(a, QuantizedKVCache):
            for x, y in zip(a.state, b.state):
                assert mx.array_equal(x[..., : a.offset, :], y[..., : b.offset, :])
