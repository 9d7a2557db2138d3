"""A decoded token's graph: the compiled and merged path gives the plain path's tokens and logits,
full model and sub-model alike, and evaluates few primitives (a ceiling keeps it so); the decode
step compiled whole gives the op-by-op step's logits and cache, and is traced few times."""

import re
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma3n.cache import SlotCache, attend, reserve
from mlx_gemma3n.loading import load_model
from mlx_gemma3n.model.text import TextModel, fuse_for_inference
from mlx_gemma3n.plan import Plan
from mlx_gemma3n.sampling import make_sampler, warp

PROMPT = [2, 105, 2364, 107, 9259, 563, 496, 1029, 5, 6, 7, 8]
# Views make no kernel of their own; what remains is what a decoded token launches.
VIEWS = {"Broadcast", "Reshape", "Slice", "Transpose", "ExpandDims", "Squeeze", "Flatten", "Unflatten", "AsStrided",
         "View", "StopGradient"}
# One greedy decode step of the tiny model on the CPU back-end (whose attention, rotations and
# norms are made of several primitives each): 594 kernels with the AltUp coefficients elementwise
# and gate/up merged, 642 before those, 1310 before the compiled chains.
TINY_DECODE_KERNELS = 620
# The same step compiled whole (`Gemma3n.decode`), attending over the reserved cache's slots:
# 587, 603 while MLX's general attention graph masked them (a multiply and a select per layer).
TINY_COMPILED_DECODE_KERNELS = 595
# Its graph nodes, views included: each is made at every replay and walked at every evaluation.
# 1220; 1348 while the AltUp coefficient weights were sliced into columns at every token.
TINY_COMPILED_DECODE_NODES = 1230


def primitives(tmp_path, *outputs) -> Counter:
    """The primitives, by name, that computing `outputs` evaluates (inputs already evaluated)."""
    dot = tmp_path / "graph.dot"
    mx.export_to_dot(str(dot), *outputs)
    return Counter(re.findall(r'label ="(\w+)"', dot.read_text()))


def kernels(tmp_path, *outputs) -> int:
    """The primitives other than views that computing `outputs` runs."""
    return sum(n for name, n in primitives(tmp_path, *outputs).items() if name not in VIEWS)


@pytest.fixture(scope="module")
def plain(tiny):
    return load_model(tiny[0], dtype=mx.float32)[0]


@pytest.fixture(scope="module")
def fused(tiny):
    model = load_model(tiny[0], dtype=mx.float32)[0]
    fuse_for_inference(model)
    return model


def sub_model(config) -> Plan:
    """Layer 3 skipped, every other feed-forward at half its width."""
    layers = [i for i in range(config.num_hidden_layers) if i != 3]
    return Plan.of(config, layers, [config.intermediate_size[i] // 2 for i in layers], name="half")


def greedy(model, plan, steps: int = 4, compiled: bool = True) -> tuple[list[int], list[np.ndarray]]:
    """The prompt's logits, then those of `steps` greedy tokens, and the tokens."""
    if not compiled:
        mx.disable_compile()
    try:
        cache = model.make_cache(plan)
        logits = model(mx.array([PROMPT]), cache=cache, plan=plan)
        every, tokens = [np.array(logits[0])], []
        for _ in range(steps):
            tokens.append(int(mx.argmax(logits[0, -1])))
            logits = model(mx.array([[tokens[-1]]]), cache=cache, plan=plan)
            every.append(np.array(logits[0]))
    finally:
        mx.enable_compile()
    return tokens, every


@pytest.mark.parametrize("which", ["full", "sub-model"])
def test_the_compiled_and_merged_path_gives_the_plain_paths_tokens_and_logits(plain, fused, which):
    config = plain.config.text
    plan = Plan.full(config) if which == "full" else sub_model(config)
    tokens, logits = greedy(fused, plan)
    expected_tokens, expected_logits = greedy(plain, plan, compiled=False)
    assert tokens == expected_tokens
    for step, (ours, theirs) in enumerate(zip(logits, expected_logits)):
        worst = np.abs(ours - theirs).max()
        assert worst <= 1e-4, f"step {step} (0: the prompt): max |Δlogit| {worst:.2e}"


# Decoded tokens enough for the tiny model's sliding caches (window 8) to reach their largest
# buffer and be compacted once after that.
DECODED = 80


@pytest.mark.parametrize("which", ["full", "sub-model"])
def test_the_compiled_decode_step_gives_the_op_by_op_logits_and_cache(fused, which):
    config = fused.config.text
    plan = Plan.full(config) if which == "full" else sub_model(config)
    by_op, compiled = fused.make_cache(plan), fused.make_cache(plan)
    logits = fused(mx.array([PROMPT]), cache=by_op, plan=plan)
    fused(mx.array([PROMPT]), cache=compiled, plan=plan)
    for step in range(DECODED):
        token = mx.argmax(logits[:, -1], axis=-1)[:, None]
        logits = fused(token, cache=by_op, plan=plan)
        theirs = fused.decode(token, compiled, plan)
        worst = np.abs(np.array(logits) - np.array(theirs)).max()
        assert worst <= 1e-4, f"decoded token {step}: max |Δlogit| {worst:.2e}"
    # Both caches hold the same positions: a next turn's prompt sees the same past.
    worst = np.abs(np.array(fused(mx.array([PROMPT]), cache=by_op, plan=plan))
                   - np.array(fused(mx.array([PROMPT]), cache=compiled, plan=plan))).max()
    assert worst <= 1e-4, f"next turn: max |Δlogit| {worst:.2e}"
    assert [c.offset for c in compiled] == [c.offset for c in by_op] == [len(PROMPT) * 2 + DECODED] * len(by_op)


def test_a_reply_traces_its_compiled_decode_step_twice_at_most(tiny, monkeypatch):
    """One call runs op by op (a plan's first), one traces the step, and one traces it again when
    the sliding caches reach their largest buffer; every other token replays the trace."""
    model = load_model(tiny[0], dtype=mx.float32)[0]
    fuse_for_inference(model)
    calls = []
    decoder = TextModel.__call__
    monkeypatch.setattr(TextModel, "__call__", lambda self, *a, **k: calls.append(1) or decoder(self, *a, **k))
    cache = model.make_cache()
    token = mx.argmax(model(mx.array([PROMPT]), cache=cache)[:, -1], axis=-1)[:, None]
    calls.clear()
    for _ in range(DECODED):
        token = mx.argmax(model.decode(token, cache)[:, -1], axis=-1)[:, None]
        mx.eval(token)
    assert len(calls) == 3


def test_replies_of_many_lengths_keep_a_few_traces(tiny, monkeypatch):
    """Each reservation's buffer shape is a trace of its own (a few MB each at full size): the
    least recently used beyond `TRACES_KEPT` is dropped, and traced again if it comes back."""
    from mlx_gemma3n.cache import reserve
    from mlx_gemma3n.model.decode import TRACES_KEPT

    model = load_model(tiny[0], dtype=mx.float32)[0]
    fuse_for_inference(model)
    calls = []
    decoder = TextModel.__call__
    monkeypatch.setattr(TextModel, "__call__", lambda self, *a, **k: calls.append(1) or decoder(self, *a, **k))

    def reply(positions: int) -> int:
        """Decoder calls of two decoded tokens, the full caches reserved for `positions`."""
        cache = model.make_cache()
        reserve(cache, positions)
        token = mx.argmax(model(mx.array([PROMPT]), cache=cache)[:, -1], axis=-1)[:, None]
        calls.clear()
        for _ in range(2):
            token = mx.argmax(model.decode(token, cache)[:, -1], axis=-1)[:, None]
            mx.eval(token)
        return len(calls)

    sizes = [256 * (i + 1) for i in range(TRACES_KEPT + 1)]
    assert reply(sizes[0]) == 2  # a plan's first call op by op, then its trace
    assert [reply(n) for n in sizes[1:]] == [1] * TRACES_KEPT  # the first size's trace is dropped now
    assert reply(sizes[-1]) == 0
    assert reply(sizes[0]) == 1


def test_merging_leaves_the_layers_their_own_weights(plain, fused):
    for a, b in zip(plain.language_model.layers, fused.language_model.layers):
        for name in ("q_proj", "k_proj", "v_proj"):
            if name in a.self_attn:
                assert mx.array_equal(a.self_attn[name].weight, b.self_attn[name].weight)
        assert mx.array_equal(a.laurel.linear_left.weight, b.laurel.linear_left.weight)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_the_router_scale_folded_into_its_norm_gives_the_reference_bits(fused, dtype):
    hidden = fused.config.text.hidden_size  # 2^6, as E2B's and E4B's 2^11
    x = mx.random.normal((1, 3, hidden), key=mx.random.key(1)).astype(dtype)
    for layer in fused.language_model.layers:
        norm = layer.altup.router_norm
        assert layer.router_norm_weight() is not norm.weight  # folded
        reference = mx.fast.rms_norm(x, norm.weight.astype(dtype), norm.eps) * (1 / hidden)
        assert mx.array_equal(layer.kernels.router_input(x, layer.router_norm_weight().astype(dtype)), reference)


def test_a_decoded_token_evaluates_few_primitives(fused, tmp_path):
    cache = fused.make_cache()
    mx.eval(fused(mx.array([PROMPT]), cache=cache))
    step = mx.argmax(fused(mx.array([[PROMPT[-1]]]), cache=cache)[:, -1], axis=-1)
    assert kernels(tmp_path, step) <= TINY_DECODE_KERNELS


def test_a_compiled_decoded_token_evaluates_few_primitives(tiny, tmp_path):
    # A model of its own: once a sub-model has run, each down_proj is stored in two blocks of its
    # inputs (`SplitColumns`), which the full width then runs as two products and a sum.
    fused = load_model(tiny[0], dtype=mx.float32)[0]
    fuse_for_inference(fused)
    cache = fused.make_cache()
    reserve(cache, len(PROMPT) + 4)  # as a reply does: no buffer grows inside the counted step
    mx.eval(fused(mx.array([PROMPT]), cache=cache))
    for token in PROMPT[-2:]:  # the first call traces, op by op
        mx.eval(fused.decode(mx.array([[token]]), cache), [c.state for c in cache])
    step = mx.argmax(fused.decode(mx.array([[PROMPT[-3]]]), cache)[:, -1], axis=-1)
    assert kernels(tmp_path, step) <= TINY_COMPILED_DECODE_KERNELS
    assert sum(primitives(tmp_path, step).values()) <= TINY_COMPILED_DECODE_NODES


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_one_query_over_masked_slots_equals_mlx_attention(window, dtype):
    """The compiled step's attention (scores and mask in one product) against MLX's, grouped
    queries (8 heads over 2), slots 0-9 written of 16, the query at slot 9."""
    q, k, v = (mx.random.normal(shape, key=mx.random.key(i)).astype(dtype)
               for i, shape in enumerate([(1, 8, 1, 32), (1, 2, 16, 32), (1, 2, 16, 32)]))
    cache = SlotCache(k, v, mx.array(9), mx.array(9), window)
    held = mx.arange(16)
    visible = (held <= 9) & (held > 9 - window if window else True)
    ours = attend(q, k, v, scale=0.5, mask=cache.mask(1))
    theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.5, mask=visible[None])
    tolerance = 1e-5 if dtype == mx.float32 else 2e-2
    assert ours.dtype == dtype
    assert mx.abs(ours.astype(mx.float32) - theirs.astype(mx.float32)).max().item() < tolerance


def test_top_k_draws_follow_the_warped_distribution():
    logits = mx.array(np.random.default_rng(0).normal(size=(1, 500)).astype(np.float32) * 2)
    expected = np.array(mx.softmax(warp(logits, 0.8, 5, 0.9), axis=-1))[0]
    sample = make_sampler(0.8, top_k=5, top_p=0.9)
    keys = mx.random.split(mx.random.key(0), 2000)
    drawn = np.array([int(sample(logits, k)[0]) for k in keys])
    frequencies = np.bincount(drawn, minlength=500) / len(drawn)
    assert set(np.flatnonzero(frequencies)) <= set(np.flatnonzero(expected))
    assert np.abs(frequencies - expected).max() < 0.04
