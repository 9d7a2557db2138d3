"""The decoder equals transformers' Gemma 3n on tiny random checkpoints, through every entry path."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from mlx_gemma3n.cache import SlidingWindowCache
from mlx_gemma3n.loading import load_model
from mlx_gemma3n.submodel import Submodel

TOL = 1e-3


def worst(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def prompt_ids(n: int, seed: int = 0) -> np.ndarray:
    """Text ids with a few vision and audio ids among them (their own embedders, PLE row 0)."""
    ids = np.random.RandomState(seed).randint(0, 262_144, size=(1, n))
    ids[0, 3], ids[0, 9], ids[0, 17] = 262_150, 262_300, 262_399
    return ids


@pytest.fixture(scope="module")
def ours(tiny):
    path, _ = tiny
    model, _ = load_model(path, dtype=mx.float32)
    return model


@pytest.fixture(scope="module")
def ids():
    return prompt_ids(40)  # five times the sliding window of 8


@pytest.fixture(scope="module")
def reference_logits(tiny, ids):
    _, reference = tiny
    with torch.no_grad():
        return reference(input_ids=torch.tensor(ids)).logits.numpy()


def test_full_forward_equals_reference(ours, ids, reference_logits):
    logits = np.array(ours(mx.array(ids)))
    assert worst(logits, reference_logits) <= TOL, f"worst |Δlogit| {worst(logits, reference_logits):.2e}"


def test_cached_decoding_equals_full_forward_at_every_position(ours, ids, reference_logits):
    cache = ours.make_cache()
    steps = [np.array(ours(mx.array(ids[:, i : i + 1]), cache=cache))[:, 0] for i in range(ids.shape[1])]
    diff = worst(np.stack(steps, axis=1), reference_logits)
    assert diff <= TOL, f"worst |Δlogit| token by token: {diff:.2e}"


def test_chunked_prefill_then_decode_equals_full_forward(ours, ids, reference_logits):
    cache, outputs = ours.make_cache(), []
    for start, stop in ((0, 5), (5, 19), (19, 20), (20, 33), (33, 40)):  # chunks below, at and over the window
        outputs.append(np.array(ours(mx.array(ids[:, start:stop]), cache=cache)))
    diff = worst(np.concatenate(outputs, axis=1), reference_logits)
    assert diff <= TOL, f"worst |Δlogit| with uneven chunks: {diff:.2e}"


def test_chunks_that_give_only_their_last_logits_equal_the_full_computation(ours, ids, reference_logits):
    """With `outputs="last"` the KV-shared layers run for a chunk's last position alone (at its
    own position, over what it may see of the keys and values); the layers below still fill the
    cache for every position, as the full computation does."""
    last, full = ours.make_cache(), ours.make_cache()
    for start, stop in ((0, 5), (5, 19), (19, 20), (20, 33), (33, 40)):  # chunks below, at and over the window
        chunk = mx.array(ids[:, start:stop])
        logits = np.array(ours(chunk, cache=last, outputs="last"))
        assert logits.shape[1] == 1
        diff = worst(logits[:, 0], reference_logits[:, stop - 1])
        assert diff <= TOL, f"chunk {start}-{stop}: worst |Δlogit| {diff:.2e}"
        mx.eval(ours(chunk, cache=full))
        for a, b in zip(last, full):
            assert a.offset == b.offset and all(mx.array_equal(x, y).item() for x, y in zip(a.state, b.state))


@pytest.mark.parametrize("skipped", [(), (5, 6, 7)])  # with and without the KV-shared layers (5-7)
def test_the_last_position_alone_equals_the_last_of_all(ours, ids, skipped):
    submodel = Submodel(skipped)
    everything = ours(mx.array(ids[:, :30]), cache=ours.make_cache(submodel=submodel), submodel=submodel)
    last = ours(mx.array(ids[:, :30]), cache=ours.make_cache(submodel=submodel), submodel=submodel, outputs="last")
    assert last.shape[1] == 1
    assert worst(last, everything[:, -1:]) <= 1e-5


def test_decoding_past_many_cache_buffers_equals_reference(tiny, ours):
    """Long enough for the sliding caches to move their window to a new buffer several times,
    in single tokens and in chunks shorter and longer than the window and the buffer step."""
    _, reference = tiny
    n = 3 * SlidingWindowCache.step + 40
    long_ids = prompt_ids(n, seed=7)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(long_ids)).logits.numpy()
    cuts = [0, 1, 2, 9, 80, 81, 150, 151, 152, 200, n]
    cache, outputs = ours.make_cache(), []
    for start, stop in zip(cuts, cuts[1:]):
        outputs.append(np.array(ours(mx.array(long_ids[:, start:stop]), cache=cache)))
    diff = worst(np.concatenate(outputs, axis=1), expected)
    assert diff <= TOL, f"worst |Δlogit| over {n} tokens in chunks: {diff:.2e}"


def test_prompt_chunks_over_a_long_cache_attend_in_blocks_of_keys_as_the_reference(tiny, ours, monkeypatch):
    """On the CPU a chunk over more than KEY_BLOCK cached positions runs a blockwise softmax;
    blocks of 50 keys here, so that the full-attention layers' chunks cross several."""
    from mlx_gemma3n import cache as caches

    _, reference = tiny
    long_ids = prompt_ids(232, seed=7)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(long_ids)).logits.numpy()
    monkeypatch.setattr(caches, "KEY_BLOCK", 50)
    blockwise, positions = caches.attend_in_key_blocks, []

    def counted(queries, keys, *rest):
        positions.append(keys.shape[2])
        return blockwise(queries, keys, *rest)

    monkeypatch.setattr(caches, "attend_in_key_blocks", counted)
    cuts = [0, 40, 100, 101, 180, 232]
    cache, outputs = ours.make_cache(), []
    for start, stop in zip(cuts, cuts[1:]):
        outputs.append(np.array(ours(mx.array(long_ids[:, start:stop]), cache=cache)))
    assert max(positions) == 232  # the last chunk's full-attention layers took the blockwise path
    diff = worst(np.concatenate(outputs, axis=1), expected)
    assert diff <= TOL, f"worst |Δlogit| with keys in blocks: {diff:.2e}"


def test_sliding_layers_keep_only_the_window_and_shared_layers_have_no_cache(ours):
    config = ours.config.text
    window, tokens = config.sliding_window, SlidingWindowCache.step * 3
    cache = ours.make_cache()
    for token in prompt_ids(tokens, seed=5)[0].tolist():
        ours(mx.array([[token]]), cache=cache)
    assert len(cache) == config.first_kv_shared_layer < config.num_hidden_layers
    for kind, layer_cache in zip(config.layer_types, cache):
        if kind == "sliding_attention":  # a buffer of the window plus one step, never the whole context
            assert layer_cache.keys.shape[2] <= window - 1 + SlidingWindowCache.step < tokens
            assert layer_cache.offset == tokens and layer_cache.held >= window - 1
        else:
            assert layer_cache.offset == tokens <= layer_cache.keys.shape[2]


def test_embeddings_input_is_scaled_like_ids(ours, ids):
    """Giving the model its own embeddings (as multimodal prompts do) changes nothing."""
    direct = np.array(ours(mx.array(ids)))
    via_embeddings = np.array(ours(mx.array(ids), input_embeddings=ours.embed(mx.array(ids))))
    assert worst(direct, via_embeddings) == 0.0


def test_embeddings_without_ids_equal_reference(tiny, ours, ids):
    """Without ids there is no token-identity half of the per-layer inputs, as in the reference."""
    _, reference = tiny
    with torch.no_grad():
        embeds = reference.model.language_model.embed_tokens(torch.tensor(ids))
        expected = reference.model.language_model(inputs_embeds=embeds).last_hidden_state.numpy()
    hidden = np.array(ours.language_model(embeddings=mx.array(embeds.numpy())))
    assert worst(hidden, expected) <= TOL, f"worst |Δhidden| {worst(hidden, expected):.2e}"


def test_greedy_generation_equals_transformers(tiny, ours):
    from mlx_gemma3n.runtime.generation import SamplingOptions, stream_tokens
    from mlx_gemma3n.tokenizer import load_tokenizer

    path, reference = tiny
    prompt = prompt_ids(20, seed=3)[0]
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor(prompt[None]), max_new_tokens=30, do_sample=False, eos_token_id=[]
        )[0, len(prompt):].tolist()
    tokenizer = load_tokenizer(path, eos_token_ids=[])
    got = [r.token for r in stream_tokens(ours, tokenizer, prompt.tolist(), max_tokens=30,
                                          sampling=SamplingOptions(temperature=0.0), prefill_step_size=5)]
    assert got == expected


def _rewrite_config(src, dst, edit):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))


def test_transformers_4_53_config_dialect_loads_the_same_model(tiny, ours, ids, tmp_path):
    def to_4_53(config):
        text = config["text_config"]
        rope = text.pop("rope_parameters")
        text["rope_theta"] = rope["full_attention"]["rope_theta"]
        text["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        text.update(query_pre_attn_scalar=text["head_dim"], rope_scaling=None, altup_lr_multiplier=1.0,
                    torch_dtype="float32")
        config["transformers_version"] = "4.53.0"

    _rewrite_config(tiny[0], tmp_path / "old", to_4_53)
    old, _ = load_model(tmp_path / "old", dtype=mx.float32)
    assert old.config.text == ours.config.text
    assert worst(old(mx.array(ids)), ours(mx.array(ids))) == 0.0


def test_published_files_with_unused_shared_layer_kv_weights_load(tiny, ours, ids, tmp_path):
    """Google's files carry k/v projections for the KV-shared layers; transformers 5 omits them."""
    path = tmp_path / "published"
    shutil.copytree(tiny[0], path)
    file = next(path.glob("*.safetensors"))
    tensors = load_file(file)
    config = ours.config.text
    rng = np.random.RandomState(0)
    for i in range(config.first_kv_shared_layer, config.num_hidden_layers):
        kv = config.num_key_value_heads * config.head_dim
        prefix = f"model.language_model.layers.{i}.self_attn."
        tensors[prefix + "k_proj.weight"] = rng.randn(kv, config.hidden_size).astype(np.float32)
        tensors[prefix + "v_proj.weight"] = rng.randn(kv, config.hidden_size).astype(np.float32)
        tensors[prefix + "k_norm.weight"] = rng.randn(config.head_dim).astype(np.float32)
    save_file(tensors, file, metadata={"format": "pt"})
    published, _ = load_model(path, dtype=mx.float32)
    assert worst(published(mx.array(ids)), ours(mx.array(ids))) == 0.0


def test_the_default_dtype_is_the_fast_one_of_the_device(tiny):
    model, _ = load_model(tiny[0])
    expected = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    assert model.language_model.embed_tokens.weight.dtype == expected


def test_bfloat16_stays_close(tiny, ids, reference_logits):
    model, _ = load_model(tiny[0], dtype=mx.bfloat16)
    assert model.language_model.embed_tokens.weight.dtype == mx.bfloat16
    logits = np.array(model(mx.array(ids)).astype(mx.float32))
    assert np.isfinite(logits).all()
    # bf16 carries ~3 significant digits through 8 layers: loose, but catches a broken dtype path.
    assert np.mean(np.argmax(logits, -1) == np.argmax(reference_logits, -1)) > 0.8


def test_a_prompt_chunk_that_only_fills_the_cache_leaves_the_cache_of_the_full_computation(ours, ids):
    """The KV-shared layers run only for positions whose logits are needed: a chunk that fills
    the cache stops after the last layer with a cache, and what follows is unchanged."""
    chunk, rest = mx.array(ids[:, :20]), mx.array(ids[:, 20:24])
    full, short = ours.make_cache(), ours.make_cache()
    mx.eval(ours(chunk, cache=full))
    assert ours(chunk, cache=short, outputs="none") is None
    for a, b in zip(full, short):
        assert a.offset == b.offset and all(mx.array_equal(x, y).item() for x, y in zip(a.state, b.state))
    diff = worst(ours(rest, cache=full), ours(rest, cache=short))
    assert diff == 0.0, f"worst |Δlogit| {diff:.2e}"
