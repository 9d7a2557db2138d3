"""The checkpoint's tokenizer read with the Rust `tokenizers` library and its chat template rendered
with jinja2, without transformers: a text-only process then imports neither transformers nor torch.
Everything here behaves as transformers 5's GemmaTokenizer does on the same files."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime
from numbers import Integral
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer

from .errors import CheckpointError, InputError, InputTypeError
from .heap import release_freed_memory

# transformers' named special tokens, and the values GemmaTokenizer gives those a config leaves out.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
GEMMA_DEFAULT_TOKENS = {
    "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
}


class ChatTemplateError(InputError):
    """The chat template rejected the conversation (its `raise_exception`) or is not valid jinja."""


class Tokenizer:
    """Encode, decode, chat template and streaming detokenizer of one checkpoint.

    Whether `encode(..., add_special_tokens=True)` adds <bos> is decided by tokenizer.json's
    post-processor alone: transformers 5 drops tokenizer_config.json's add_bos_token and
    add_eos_token whenever a tokenizer.json exists (the published Gemma 3n tokenizer.json
    prepends <bos>; a tokenizer.json without a post-processor adds nothing)."""

    def __init__(self, backend: RustTokenizer, special_tokens: dict[str, str | None], chat_template: str | None,
                 eos_token_ids: Iterable[int]):
        self._backend = backend
        self.special_tokens = special_tokens
        self.chat_template = chat_template
        self._compiled_template = None
        self.eos_token_ids = eos_token_ids

    @classmethod
    def load(cls, path: Path, eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """Read `path`'s tokenizer.json, tokenizer_config.json and chat template. `eos_token_ids`
        (the model's stop tokens) are joined by the tokenizer's own eos token, as mlx-lm does."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path} has no tokenizer.json, which is needed to read the tokenizer.")
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        backend = RustTokenizer.from_file(str(path / "tokenizer.json"))
        # transformers encodes one text at a time with no padding and no truncation, whatever the file says.
        backend.no_padding()
        backend.no_truncation()
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        special_tokens, extra_tokens = _special_tokens(config)
        _mark_special(backend, [t for t in special_tokens.values() if t is not None] + extra_tokens)
        tokenizer = cls(backend, special_tokens, _chat_template(path, config), eos_token_ids)
        release_freed_memory()
        if tokenizer.eos_token_id is not None:
            tokenizer.eos_token_ids.add(tokenizer.eos_token_id)
        return tokenizer

    # Text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = _as_ids(ids)
        # The Rust default skips special tokens; transformers' default keeps them.
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids):
        """The piece of one id (None when out of range), or the pieces of a sequence of ids."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # a numpy or mlx array, or scalar
        if isinstance(ids, Integral):
            return self._backend.id_to_token(int(ids))
        return [self._backend.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        """The id of one piece (the unknown token's id when the vocabulary lacks it), or of each piece."""
        if tokens is None:
            return None
        if isinstance(tokens, str):
            found = self._backend.token_to_id(tokens)
            return found if found is not None else self._token_id("unk_token")
        return [self.convert_tokens_to_ids(t) for t in tokens]

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # Special tokens

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id("eos_token")

    @property
    def eos_token_ids(self) -> set[int]:
        return self._eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: Iterable[int]) -> None:
        self._eos_token_ids = {int(i) for i in ids}

    def _token_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    # Chat template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = False,
                            tools: list[dict] | None = None, documents: list[dict] | None = None,
                            continue_final_message: bool | str = False, **extra_context):
        """The conversation rendered by the checkpoint's template, with the variables transformers
        passes (messages, add_generation_prompt, tools, documents, every named special token such as
        bos_token, then `extra_context`, which overrides them); its ids (no special tokens added)
        when `tokenize`. `continue_final_message` leaves the last message open, ending the prompt
        with its content (or with the key it names), so that the model continues that text."""
        if not self.chat_template:
            raise InputError("This tokenizer has no chat template: give the prompt as text, or use a checkpoint "
                             "whose tokenizer has one.")
        if not messages:
            raise InputError("Cannot apply a chat template to an empty conversation: give at least one message.")
        # As transformers does: message objects become dicts, keys set to None are dropped, and the
        # template sees only plain data (a template could call the methods of an image or array).
        messages = [_as_plain_data(m) for m in messages]
        if not all(isinstance(m, dict) for m in messages):
            raise InputTypeError("Chat messages must be dicts (or dataclasses or pydantic models).")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        if continue_final_message:
            if add_generation_prompt:
                raise InputError("continue_final_message and add_generation_prompt exclude each other: continue "
                                 "the final message, or open a new model turn.")
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            final_text = _tag_final_message(messages[-1], field, self.chat_template)
        variables = {name: token for name, token in self.special_tokens.items() if token is not None}
        variables.update(extra_context)
        import jinja2

        try:
            if self._compiled_template is None:
                self._compiled_template = _compile_chat_template(self.chat_template)
            text = self._compiled_template.render(
                messages=messages, tools=_as_plain_data(tools), documents=_as_plain_data(documents),
                add_generation_prompt=add_generation_prompt, **_as_plain_data(variables),
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(str(e)) from e
        if continue_final_message:
            text = _cut_after_final_message(text, final_text)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # Streaming

    @property
    def detokenizer(self) -> StreamingDetokenizer:
        """A new streaming detokenizer, so that concurrent replies never share state."""
        return StreamingDetokenizer(self._backend)


def load_tokenizer(path: Path, eos_token_ids: Iterable[int] = ()) -> Tokenizer:
    """`Tokenizer.load`, under the name mlx-lm's loader has."""
    return Tokenizer.load(path, eos_token_ids)


class StreamingDetokenizer:
    """Text of a reply as its tokens arrive (the interface of mlx-lm's streaming detokenizers).

    Each new token is decoded in a short window: the ids not yet emitted, after the last emitted
    piece as context (so a decoder that treats the start of a text specially sees it once); the
    window's new text is emitted once it is settled. Text is not settled while it ends in U+FFFD
    (an incomplete UTF-8 character) or ends inside a run of byte-fallback tokens (<0xE2>...): the
    decoder turns a whole run into text at once, and into one U+FFFD per byte if any of it is not
    UTF-8, so a character spelled in bytes appears with the first ordinary token after its run
    (or at finalize); an id the tokenizer does not know is skipped inside a run, as decode() skips
    it. The segments then add up exactly to decode(all ids)."""

    def __init__(self, backend: RustTokenizer):
        self._backend = backend
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self._segments: list[str] = []
        self._unread = 0  # index of the first segment last_segment has not returned
        self._context: list[int] = []
        self._pending: list[int] = []

    def add_token(self, token: int) -> None:
        token = int(token)
        self.tokens.append(token)
        self._pending.append(token)
        piece = self._backend.id_to_token(token)
        # An id the tokenizer lacks (the model has more logits than some tokenizers have ids) decodes
        # to nothing, so, as in decode(), it does not end a run of bytes.
        if piece is not None and not _is_byte_token(piece):
            self._emit(force=False)

    def finalize(self) -> None:
        self._emit(force=True)

    @property
    def text(self) -> str:
        return "".join(self._segments)

    @property
    def last_segment(self) -> str:
        """The text emitted since the previous read."""
        segment = "".join(self._segments[self._unread:])
        self._unread = len(self._segments)
        return segment

    def _emit(self, force: bool) -> None:
        if not self._pending:
            return
        context_text = self._decode(self._context)
        text = self._decode(self._context + self._pending)
        settled = text.startswith(context_text) and not text.endswith("\ufffd")
        if settled or force:
            self._segments.append(text[len(context_text):])
            self._context, self._pending = self._pending, []

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=False) if ids else ""


# Marks where the final message ends in the rendered text, as transformers does: what follows
# it (the end of the turn) is cut off.
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final_message(message: dict, field: str, template: str) -> str:
    """Append CONTINUE_TAG to `message[field]` (to its last text part when it is a list of parts);
    return the text it followed."""
    final = message.get(field)
    if final is None:
        raise InputError(f'The final message has no "{field}" to continue: give it one, or leave '
                         f"continue_final_message off.")
    if field not in template:
        raise InputError(f'The chat template never reads "{field}", so it cannot be continued: continue '
                         f'"content" instead.')
    if isinstance(final, (list, tuple)):
        part = next((p for p in reversed(final) if isinstance(p, dict) and "text" in p), None)
        if part is None:
            raise InputError("The final message has no text part to continue: add one, or leave "
                             "continue_final_message off.")
        final, part["text"] = part["text"], part["text"] + CONTINUE_TAG
    else:
        message[field] = final + CONTINUE_TAG
    return final


def _cut_after_final_message(text: str, final: str) -> str:
    if final.strip() not in text or CONTINUE_TAG.strip() not in text:
        raise InputError("The chat template changes the final message, so it cannot be continued: leave "
                         "continue_final_message off.")
    end = text.rindex(CONTINUE_TAG.strip())
    if text[end:end + len(CONTINUE_TAG)] == CONTINUE_TAG:
        return text[:end]
    return text[:end].rstrip()  # the template trims the message's trailing space, and so the tag's


def _as_ids(ids) -> list[int]:
    # An id or ids as a list of ints, from a list, a numpy or an mlx array.
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    return [int(ids)] if isinstance(ids, Integral) else [int(i) for i in ids]


def _is_byte_token(piece: str | None) -> bool:
    # The pieces the ByteFallback decoder reads as one byte each: "<0x" two hex digits ">".
    return (piece is not None and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
            and all(c in "0123456789abcdefABCDEF" for c in piece[3:5]))


def _token_content(value) -> str | None:
    # A token in tokenizer_config.json is a string or a serialized AddedToken ({"content": ...}).
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens(config: dict) -> tuple[dict[str, str | None], list[str]]:
    """(named special tokens, e.g. {"bos_token": "<bos>", "image_token": ...}; the unnamed extra ones).
    As transformers: every "*_token" key of the config is a named token (an explicit null clears one
    of GemmaTokenizer's defaults), and so is each entry of a dict of extra_special_tokens."""
    named: dict[str, str | None] = dict(GEMMA_DEFAULT_TOKENS)
    for key, value in config.items():
        if key in NAMED_TOKENS and value is None:
            named[key] = None
        elif key.endswith("_token") and _token_content(value) is not None:
            named[key] = _token_content(value)
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, Mapping):
        named.update({key: _token_content(value) for key, value in extra.items() if _token_content(value)})
        extra = []
    return named, [t for t in map(_token_content, extra) if t is not None]


def _mark_special(backend: RustTokenizer, tokens: list[str]) -> None:
    """Make the config's special tokens special added tokens (matched whole in text, skipped by
    skip_special_tokens), as transformers does, also where tokenizer.json keeps one as an ordinary
    piece or as a non-special added token (Gemma's lists <mask> so). A token missing from the
    vocabulary is not appended as transformers would (GemmaTokenizer names "<mask>" by default):
    its new id would lie past the model's embedding."""
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    unmarked = [t for t in dict.fromkeys(tokens) if t not in special and backend.token_to_id(t) is not None]
    if unmarked:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in unmarked])


def _chat_template(path: Path, config: dict) -> str | None:
    """chat_template.jinja (what transformers 5 saves, and prefers to the config's key), else the
    legacy chat_template.json that processors read, else tokenizer_config.json's chat_template. A
    list of named templates gives the one named "default", else the first."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file():
        template = json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    else:
        template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", template[0].get("template") if template else None)
    return template or None


def _as_plain_data(value):
    """`value` rebuilt from JSON-like types, anything else (an image, an array) replaced by a
    placeholder naming its type, as transformers gives chat templates."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums...) carry methods of their own
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_as_plain_data(k): _as_plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_as_plain_data(v) for v in value)
    numpy = sys.modules.get("numpy")  # a numpy scalar can only come from a process that imported numpy
    if numpy is not None and isinstance(value, numpy.generic):
        return _as_plain_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _as_plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic messages, e.g. from the OpenAI SDK
        return _as_plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _compile_chat_template(source: str):
    """The template in the jinja2 environment transformers renders chat templates in."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks the assistant's text for transformers'
        # assistant-token masks; rendering, it is just its body.
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise ChatTemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # `dict(...)` and `dict.fromkeys(...)` without handing the template the type itself.
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # No underscore names on a namespace, so that a template cannot reach Python internals.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace attribute cannot start with '_': {name!r}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env.from_string(source)
