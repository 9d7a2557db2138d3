"""mlx_gemma3n.tokenizer reads the checkpoint's tokenizer without transformers and behaves as
transformers' GemmaTokenizer (AutoTokenizer) does on the same files: the reference here."""

import json
import random
from pathlib import Path

import jinja2
import pytest
from checkpoints import SPECIAL_TOKENS, VOCAB_SIZE, write_tokenizer
from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import processors

from mlx_gemma3n.tokenizer import StreamingDetokenizer, Tokenizer


TEXTS = [
    "",
    "hello world",
    "the cat sat on the mat.",
    " leading space",
    "trailing space ",
    "  two  spaces  between  ",
    "one\ntwo\n\nthree\n",
    "tabs\tand\r\nwindows lines",
    "café, naïve, Ω, ß",
    "日本語のテキスト",
    "emoji 🎉 and 👍🏽 and 🇫🇷",
    "mixed: hello 世界 🌍!",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "an image <image_soft_token> and audio <audio_soft_token> inside text",
    "<bos><eos><pad><unk>",
    "<start_of_image><image_soft_token><end_of_image>",
    "not special: <start_of_turn <unused7> </s>",
    "\u2581 the piece marker itself",
]

FRAGMENTS = [
    "hello", "world", "cat", " ", "  ", "\n", "\n\n", "\t", ".", "?!", "x", "Q", "7", "é", "ß", "Ω", "日本語", "世界",
    "🎉", "👍🏽", "🇫🇷", "€", "<start_of_turn>", "<end_of_turn>", "<image_soft_token>", "<audio_soft_token>", "<bos>",
    "<eos>", "<unused7>", "\u2581",
]


def first_difference(ours, theirs) -> str:
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return (f"first difference at {i}: ours {ours[max(0, i - 3):i + 4]!r}, "
                    f"transformers {theirs[max(0, i - 3):i + 4]!r}")
    return f"one is a prefix of the other: ours has {len(ours)} items, transformers {len(theirs)}"


def assert_same(ours, theirs, context=""):
    assert ours == theirs, f"{context!r}: {first_difference(ours, theirs)}"


def random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(FRAGMENTS, k=rng.randint(1, 12))) for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def ours(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir, eos_token_ids=[1, 106])


@pytest.fixture(scope="module")
def reference(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def variant(base: Path, path: Path, config_changes: dict | None = None, files: dict | None = None) -> Path:
    """A tokenizer directory that shares `base`'s tokenizer.json, with its config edited and files added."""
    path.mkdir()
    (path / "tokenizer.json").symlink_to(base / "tokenizer.json")
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.update(config_changes or {})
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in (files or {}).items():
        (path / name).write_text(text)
    return path


def byte_ids(tokenizer, data: bytes) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in data]


def random_ids(tokenizer, count: int, seed: int) -> list[list[int]]:
    """Sequences mixing ordinary pieces, special tokens, unused ids, arbitrary byte-fallback
    bytes (so invalid UTF-8 too) and ids past the vocabulary (which a model with more logits than
    the tokenizer has ids can sample)."""
    rng = random.Random(seed)
    ordinary = sorted(set(tokenizer.encode(" ".join(TEXTS[1:12]), add_special_tokens=False)))
    pool = ordinary + list(SPECIAL_TOKENS) + byte_ids(tokenizer, bytes(range(256))) + [
        rng.randrange(VOCAB_SIZE) for _ in range(50)] + [VOCAB_SIZE + 1, 10**6] * 6  # VOCAB_SIZE: see below
    return [rng.choices(pool, k=rng.randint(0, 40)) for _ in range(count)]


def random_utf8_replies(tokenizer, count: int, seed: int) -> list[list[int]]:
    """Sequences of ordinary pieces, special tokens, and characters outside the vocabulary spelled
    as their UTF-8 bytes, one byte-fallback token each (runs of several characters too)."""
    rng = random.Random(seed)
    ordinary = sorted(set(tokenizer.encode(" ".join(TEXTS[1:8]), add_special_tokens=False)))
    specials = [105, 106, 262145, 262273]

    def random_character() -> str:
        low, high = rng.choice([(0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFC), (0x10000, 0x10FFFF)])
        return chr(rng.randint(low, high))

    replies = []
    for _ in range(count):
        ids = []
        for _ in range(rng.randint(1, 25)):
            kind = rng.random()
            if kind < 0.5:
                ids.append(rng.choice(ordinary))
            elif kind < 0.6:
                ids.append(rng.choice(specials))
            else:
                ids += byte_ids(tokenizer, "".join(random_character() for _ in range(rng.randint(1, 3))).encode())
        replies.append(ids)
    return replies


def stream(detokenizer, ids) -> list[str]:
    """The segments a reply streams as: one read of last_segment after each token, one after finalize."""
    segments = []
    for token in ids:
        detokenizer.add_token(token)
        segments.append(detokenizer.last_segment)
    detokenizer.finalize()
    segments.append(detokenizer.last_segment)
    return segments


# Encoding


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers_on_varied_text(ours, reference, add_special_tokens):
    for text in TEXTS:
        assert_same(ours.encode(text, add_special_tokens=add_special_tokens),
                    reference.encode(text, add_special_tokens=add_special_tokens), text)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers_on_random_text(ours, reference, add_special_tokens):
    for text in random_texts(300):
        assert_same(ours.encode(text, add_special_tokens=add_special_tokens),
                    reference.encode(text, add_special_tokens=add_special_tokens), text)


def test_special_token_strings_in_text_become_their_ids(ours):
    assert ours.encode("<start_of_turn>user <image_soft_token>", add_special_tokens=False)[0] == 105
    assert 262145 in ours.encode("<start_of_turn>user <image_soft_token>", add_special_tokens=False)


def test_no_bos_when_tokenizer_json_has_no_post_processor(ours, reference):
    # The test tokenizer's config says add_bos_token: true, but transformers 5 ignores it
    # whenever a tokenizer.json exists; this tokenizer.json has no post-processor.
    assert ours.encode("hello world")[0] != ours.bos_token_id
    assert_same(ours.encode("hello world"), reference.encode("hello world"))


@pytest.fixture(scope="module")
def bos_dir(tmp_path_factory) -> Path:
    """Like the published Gemma 3n tokenizer.json: a post-processor that prepends <bos>; the config's
    add_bos_token set to false, which transformers ignores."""
    path = tmp_path_factory.mktemp("bos-post-processor")
    write_tokenizer(path)
    backend = RustTokenizer.from_file(str(path / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
    backend.save(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    return path


def test_bos_from_tokenizer_json_post_processor_matches_transformers(bos_dir):
    from transformers import AutoTokenizer

    ours, reference = Tokenizer.load(bos_dir), AutoTokenizer.from_pretrained(str(bos_dir))
    for text in TEXTS:
        assert_same(ours.encode(text), reference.encode(text), text)
        assert ours.encode(text)[0] == 2
        assert_same(ours.encode(text, add_special_tokens=False), reference.encode(text, add_special_tokens=False), text)


# Decoding and pieces


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode_matches_transformers_on_random_ids(ours, reference, skip_special_tokens):
    for ids in random_ids(ours, 300, seed=1):
        assert_same(ours.decode(ids, skip_special_tokens=skip_special_tokens),
                    reference.decode(ids, skip_special_tokens=skip_special_tokens), ids)


def test_decode_reverses_encode(ours):
    for text in TEXTS[:-1]:  # not the last: "\u2581" is SentencePiece's space, and decodes to " "
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


def test_convert_ids_to_tokens_matches_transformers(ours, reference):
    ids = [0, 1, 2, 3, 105, 106, 262145, 262273, 5, 200, 255, 300, 100_000, VOCAB_SIZE - 1]
    assert ours.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(262145) == reference.convert_ids_to_tokens(262145) == "<image_soft_token>"


def test_convert_tokens_to_ids_matches_transformers(ours, reference):
    tokens = ["<bos>", "<start_of_turn>", "<0xE2>", "\u2581hello", "<unused9>", "not a piece"]
    assert ours.convert_tokens_to_ids(tokens) == reference.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("not a piece") == reference.unk_token_id


def test_special_tokens_match_transformers(ours, reference):
    assert (ours.bos_token, ours.bos_token_id) == (reference.bos_token, reference.bos_token_id) == ("<bos>", 2)
    assert (ours.eos_token, ours.eos_token_id) == (reference.eos_token, reference.eos_token_id)


def test_eos_token_ids_are_the_callers_plus_the_eos_token(tokenizer_dir, ours):
    assert ours.eos_token_ids == {1, 106}
    assert Tokenizer.load(tokenizer_dir, eos_token_ids=[106]).eos_token_ids == {1, 106}


def test_assigned_eos_token_ids_are_exactly_those(tokenizer_dir):
    tokenizer = Tokenizer.load(tokenizer_dir)
    tokenizer.eos_token_ids = [106]
    assert tokenizer.eos_token_ids == {106}


@pytest.fixture(scope="module")
def mask_dir(tmp_path_factory) -> Path:
    """As Gemma's published tokenizer.json: the config's mask token is an added token not marked special."""
    path = tmp_path_factory.mktemp("non-special-mask")
    write_tokenizer(path)
    backend = RustTokenizer.from_file(str(path / "tokenizer.json"))
    backend.add_tokens([AddedToken("<unused5000>", special=False, normalized=False)])
    backend.save(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "mask_token": "<unused5000>"}))
    return path


def test_config_tokens_listed_as_non_special_are_special_as_in_transformers(mask_dir):
    from transformers import AutoTokenizer

    ours, reference = Tokenizer.load(mask_dir), AutoTokenizer.from_pretrained(str(mask_dir))
    ids = [2, 5000, *ours.encode(" the cat", add_special_tokens=False), 5000]
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True) == " the cat"
    assert ours.decode(ids) == reference.decode(ids)
    assert_same(ours.encode("a<unused5000>b"), reference.encode("a<unused5000>b"))


def test_vocabulary_size_is_tokenizer_json_s(ours):
    # GemmaTokenizer names "<mask>", which this vocabulary lacks: transformers appends it as id
    # 262400, past the model's embedding; here it stays unknown.
    assert ours.vocab_size == len(ours) == VOCAB_SIZE
    assert ours.convert_tokens_to_ids("<mask>") == ours.convert_tokens_to_ids("<unk>")


def test_missing_tokenizer_json_says_what_is_needed(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json") as error:
        Tokenizer.load(tmp_path)
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


# Chat template

SYSTEM_AND_USER = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  What is the cat?  "}]
MULTI_TURN = [
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hello, world!"},
    {"role": "user", "content": "what is the mat?\n"},
]
WITH_MEDIA = [
    {"role": "system", "content": [{"type": "text", "text": "Describe things."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": " what is this? "}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat on a mat."}]},
    {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "and this 🎉?"}]},
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [SYSTEM_AND_USER, MULTI_TURN, WITH_MEDIA],
                         ids=["system-and-user", "multi-turn", "with-media"])
def test_chat_template_text_matches_transformers(ours, reference, messages, add_generation_prompt):
    assert_same(ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt),
                reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False))


@pytest.mark.parametrize("messages", [SYSTEM_AND_USER, WITH_MEDIA], ids=["system-and-user", "with-media"])
def test_chat_template_ids_match_transformers(ours, reference, messages):
    assert_same(ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=True),
                reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_non_alternating_roles_raise_the_templates_message(ours, reference):
    messages = [{"role": "user", "content": "hello"}, {"role": "user", "content": "again"}]
    message = "Conversation roles must alternate user/assistant/user/assistant/..."
    with pytest.raises(jinja2.TemplateError, match=message):
        reference.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ValueError) as error:
        ours.apply_chat_template(messages)
    assert str(error.value) == message


def test_a_message_that_is_not_a_mapping_is_one_of_our_errors_and_a_type_error(ours):
    from mlx_gemma3n.errors import Gemma3nError

    with pytest.raises(TypeError, match="Chat messages must be dicts") as error:
        ours.apply_chat_template(["hello"])
    assert isinstance(error.value, Gemma3nError)


class Picture:
    """An object in a message that the template must not see (it could call its methods)."""


# Exercises what transformers' jinja environment provides: trim_blocks and lstrip_blocks, loop
# controls, a namespace, tojson without HTML escaping and with options, dict(), strftime_now,
# {% generation %}, the special tokens and extra variables, tools and documents passed as None,
# None-valued keys dropped, and foreign objects replaced by a placeholder.
ENVIRONMENT_TEMPLATE = """\
{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% if message['role'] == 'skip' %}{% continue %}{% endif %}
    {% if loop.index > 4 %}{% break %}{% endif %}
    {% set ns.count = ns.count + 1 %}
[{{ message['role'] }}{% if message.name is defined %} named{% endif %}] {{ message['content'] | tojson }}
{% endfor %}
{{ ns.count }} {{ bos_token }}{{ eos_token }}{{ pad_token }}{{ unk_token }}{{ mask_token }}
{% if custom is defined %}custom={{ custom }}{% endif %}
{{ {'b': "<é & 'x'>", 'a': [1, 2.5, none, true]} | tojson(indent=2, sort_keys=True) }}
{{ dict(k=1) | tojson }} {{ strftime_now('%Y') }}
{% if tools is none %}no tools{% endif %} {% if documents is none %}no documents{% endif %}
{% generation %}generated part{% endgeneration %}
    {% if add_generation_prompt %}
<start_of_turn>model
    {% endif %}
"""


@pytest.fixture(scope="module")
def template_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """The config keeps the Gemma template; chat_template.jinja holds another one."""
    return variant(tokenizer_dir, tmp_path_factory.mktemp("template") / "t",
                   files={"chat_template.jinja": ENVIRONMENT_TEMPLATE})


@pytest.fixture(scope="module")
def template_pair(template_dir):
    from transformers import AutoTokenizer

    return Tokenizer.load(template_dir), AutoTokenizer.from_pretrained(str(template_dir))


def test_chat_template_jinja_file_wins_over_the_config(template_pair):
    ours, reference = template_pair
    assert ours.chat_template == reference.chat_template == ENVIRONMENT_TEMPLATE


@pytest.mark.parametrize("extra", [{}, {"custom": "yes"}, {"bos_token": "[BOS]"}], ids=["none", "custom", "override"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_environment_matches_transformers(template_pair, extra, add_generation_prompt):
    ours, reference = template_pair
    messages = [
        {"role": "user", "content": "<b>é</b> & 'quotes' \"double\"", "name": None},
        {"role": "skip", "content": "not shown"},
        {"role": "assistant", "content": [{"type": "image", "image": Picture()}, {"type": "text", "text": "日本"}]},
        {"role": "user", "content": "named", "name": "ann"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "past the break"},
    ]
    assert_same(ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra),
                reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                              **extra))


def test_legacy_chat_template_json_wins_over_the_config(tokenizer_dir, tmp_path):
    path = variant(tokenizer_dir, tmp_path / "t", files={"chat_template.json": json.dumps({"chat_template": "json"})})
    assert Tokenizer.load(path).chat_template == "json"


@pytest.mark.parametrize("templates, expected", [
    ([{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}], "plain"),
    ([{"name": "first", "template": "one"}, {"name": "second", "template": "two"}], "one"),
], ids=["named-default", "first"])
def test_chat_template_list_gives_default_or_first(tokenizer_dir, tmp_path, templates, expected):
    path = variant(tokenizer_dir, tmp_path / "t", {"chat_template": templates})
    assert Tokenizer.load(path).chat_template == expected


CONTINUED = [
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the cat sat"}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "  the cat sat  "}],
    [{"role": "user", "content": "hello"},
     {"role": "assistant", "content": [{"type": "text", "text": "the cat"}, {"type": "image"}, {"type": "text",
                                                                                                 "text": " sat "}]}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "what is the mat? "}],
]


@pytest.mark.parametrize("messages", CONTINUED, ids=["plain", "spaces", "parts", "user"])
def test_continue_final_message_matches_transformers(ours, reference, messages):
    text = ours.apply_chat_template(messages, continue_final_message=True)
    assert_same(text, reference.apply_chat_template(messages, continue_final_message=True, tokenize=False))
    assert not text.endswith("<end_of_turn>\n")
    assert_same(ours.apply_chat_template(messages, continue_final_message=True, tokenize=True),
                reference.apply_chat_template(messages, continue_final_message=True, return_dict=False))


def test_continue_final_message_leaves_the_callers_messages_alone(ours):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    ours.apply_chat_template(messages, continue_final_message=True)
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]


@pytest.mark.parametrize("messages, options", [
    (CONTINUED[0], {"add_generation_prompt": True}),
    ([{"role": "user", "content": [{"type": "image"}]}], {}),
    ([{"role": "user"}], {}),
    (CONTINUED[0], {"continue_final_message": "reasoning_content"}),
], ids=["with-generation-prompt", "no-text-part", "no-content", "field-the-template-lacks"])
def test_continue_final_message_refuses_what_transformers_refuses(ours, reference, messages, options):
    options = {"continue_final_message": True, **options}
    with pytest.raises(ValueError):
        reference.apply_chat_template(messages, tokenize=False, **options)
    with pytest.raises(ValueError) as error:
        ours.apply_chat_template(messages, **options)
    assert "\n" not in str(error.value) and ": " in str(error.value)


def test_no_chat_template_raises_value_error(tokenizer_dir, tmp_path):
    tokenizer = Tokenizer.load(variant(tokenizer_dir, tmp_path / "t", {"chat_template": None}))
    assert tokenizer.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])


# Streaming


def test_streamed_segments_add_up_to_decode_with_arbitrary_bytes(ours):
    for ids in random_ids(ours, 300, seed=2):
        assert_same("".join(stream(ours.detokenizer, ids)), ours.decode(ids), ids)


def test_streamed_segments_of_valid_utf8_add_up_to_decode_without_replacement_characters(ours):
    for ids in random_utf8_replies(ours, 300, seed=3):
        segments = stream(ours.detokenizer, ids)
        assert_same("".join(segments), ours.decode(ids), ids)
        assert "\ufffd" not in ours.decode(ids)
        assert not [s for s in segments if "\ufffd" in s], segments


def test_character_split_over_byte_tokens_appears_whole(ours):
    detokenizer = ours.detokenizer
    for token in byte_ids(ours, "€".encode()):
        detokenizer.add_token(token)
        assert detokenizer.last_segment == ""
    detokenizer.add_token(ours.convert_tokens_to_ids("\u2581hello"))
    assert detokenizer.last_segment == "€ hello"


def test_finalize_flushes_held_back_text(ours):
    detokenizer = ours.detokenizer
    for token in byte_ids(ours, "日本".encode()):
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.last_segment == detokenizer.text == "日本"


def test_text_is_everything_so_far_and_reset_clears_it(ours):
    detokenizer = ours.detokenizer
    ids = ours.encode("hello world, the cat", add_special_tokens=False)
    for token in ids:
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == "hello world, the cat" and detokenizer.tokens == ids
    detokenizer.reset()
    assert (detokenizer.text, detokenizer.last_segment, detokenizer.tokens) == ("", "", [])


def test_unknown_id_inside_a_byte_run_does_not_end_it(ours):
    # decode() skips an id the tokenizer lacks, so the bytes on both sides of it form one run,
    # here not UTF-8 (one U+FFFD per byte); a stream must not emit "€" before the unknown id.
    euro = byte_ids(ours, "€".encode())
    ids = euro + [VOCAB_SIZE + 5] + euro[:1] + ours.encode(" cat", add_special_tokens=False)
    assert ours.decode(ids) == "\ufffd" * 4 + " cat"
    assert "".join(stream(ours.detokenizer, ids)) == ours.decode(ids)


def test_each_detokenizer_read_is_a_fresh_one(ours):
    first = ours.detokenizer
    first.add_token(ours.convert_tokens_to_ids("\u2581hello"))
    second = ours.detokenizer
    assert second is not first and second.text == "" and first.text == " hello"


class DecodeSpy:
    """The Rust tokenizer, counting the ids of each decode call."""

    def __init__(self, backend):
        self.backend = backend
        self.window_lengths = []

    def decode(self, ids, skip_special_tokens):
        self.window_lengths.append(len(ids))
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token):
        return self.backend.id_to_token(token)


def test_each_token_decodes_a_short_window_however_long_the_reply(ours, tokenizer_dir):
    spy = DecodeSpy(RustTokenizer.from_file(str(tokenizer_dir / "tokenizer.json")))
    ids = ours.encode("hello 🎉 world, the cat sat on the mat.\n" * 200, add_special_tokens=False)
    stream(StreamingDetokenizer(spy), ids)
    assert len(ids) > 5000
    # An emoji is a run of 4 byte tokens, held with the token after it as context.
    assert max(spy.window_lengths) <= 10
