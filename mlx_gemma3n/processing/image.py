"""Image input: any reasonable source -> RGB pillow image -> Gemma 3n pixel values.

The reference is transformers' image processor for Gemma 3n, `SiglipImageProcessor`
with the checkpoint's `preprocessor_config.json`: resize to 768x768 with pillow's
bilinear filter, rescale by 1/255, no normalisation. We follow its PIL backend
(`SiglipImageProcessorPil`) bit for bit. The torchvision backend, which
`AutoImageProcessor` picks when torchvision is installed, rounds its antialiased
downscale differently and can differ from both by one grey level (1/255).

Where we differ from transformers on purpose:
- EXIF orientation is applied to every source, not only to paths and URLs.
- Transparency is composited onto white for every source (the image processor's
  rule for pillow images); transformers' `load_image`, used for paths and URLs,
  drops the alpha channel instead, which turns transparent areas black or into
  whatever colour the hidden pixels happen to hold.
- 16-bit greyscale is scaled to 8 bits; pillow's own conversion, which
  transformers uses, clips it, so most such images come out white.
- Float arrays are read as intensities in [0, 1] and rounded to 8 bits.
"""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

# Gemma 3n's published preprocessor_config.json.
IMAGE_SIZE = (768, 768)  # (height, width)
RESAMPLE = Image.Resampling.BILINEAR
RESCALE_FACTOR = 1 / 255

URL_TIMEOUT_S = 30.0
MAX_DOWNLOAD_BYTES = 200 * 1024 * 1024

_URL_SCHEMES = ("http://", "https://", "file://", "data:")


class ImageError(InputError):
    """An image source that cannot be read; the message says why and what to do."""


def load_image(source) -> Image.Image:
    """Open `source` as an upright RGB pillow image.

    `source` is a path (str or Path), an http(s)://, file:// or data: URL, the
    encoded file as bytes, a pillow image, or a numpy array (H, W), (H, W, 3) or
    (H, W, 4) of uint8 levels or of floats in [0, 1].
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _open(io.BytesIO(bytes(source)), "the image bytes")
    elif isinstance(source, str) and source.lower().startswith(_URL_SCHEMES):
        image = _open(io.BytesIO(_download(source)), _short(source))
    elif isinstance(source, (str, os.PathLike)):
        image = _open_path(Path(source))
    else:
        raise ImageError(
            f"Cannot read an image from a {type(source).__name__}: pass a path, URL, bytes, "
            "a PIL image or a numpy array."
        )
    return to_rgb(image)


def preprocess_image(source, size: tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """Gemma 3n's pixel values for one image: float32 (height, width, 3) in [0, 1].

    Equal to the reference processor's `pixel_values` for that image, channels last.
    """
    height, width = size
    image = load_image(source).resize((width, height), resample=RESAMPLE)
    # The reference rescales in float64 and rounds once to float32.
    return (np.asarray(image).astype(np.float64) * RESCALE_FACTOR).astype(np.float32)


def preprocess_images(sources, size: tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """Pixel values for several images (one prompt's worth): float32 (n, height, width, 3)."""
    sources = list(sources)
    if not sources:
        return np.zeros((0, *size, 3), np.float32)
    return np.stack([preprocess_image(s, size) for s in sources])


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB copy of a pillow image, transparency composited onto white."""
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            image = _sixteen_bit_to_l(image)
        elif image.mode == "F":
            image = _from_array(np.asarray(image))
        # Same test and compositing as transformers' convert_to_rgb.
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"Could not turn the {image.mode} image into RGB ({_reason(e)}).") from e


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    # 0..65535 -> 0..255, so that 257 * v maps back to v exactly.
    levels = np.asarray(image).astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.round(levels), 0, 255).astype(np.uint8), mode="L")


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(
            f"Cannot read an image from an array of shape {array.shape}: expected (height, width), "
            "(height, width, 3) or (height, width, 4), channels last."
        )
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
            raise ImageError(
                "A float image array must hold values in [0, 1]: "
                "pass 0..255 levels as uint8 (e.g. array.astype(np.uint8))."
            )
        array = np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ImageError(f"Cannot read an image array of dtype {array.dtype}: use uint8 levels or floats in [0, 1].")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1] if array.ndim == 3 else 2]
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def _open_path(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageError(f"Image file not found: {path}.")
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image file.")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"Could not read the image file {path} ({_reason(e)}).") from e
    return _open(io.BytesIO(data), str(path))


def _open(stream: io.BytesIO, name: str) -> Image.Image:
    """Decode fully now, so every failure surfaces here as an ImageError."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)
            image.load()
        return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(
            f"{name} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels): "
            "downscale it first, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it."
        ) from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name} is not an image file that pillow can read.") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"Could not decode {name} ({_reason(e)}): the file may be truncated or corrupt.") from e


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ImageError(f"Could not fetch the image at {_short(url)} ({_reason(e)}).") from e
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ImageError(f"The image at {_short(url)} is larger than {MAX_DOWNLOAD_BYTES >> 20} MiB.")
    return data


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None) or e
    return str(reason).rstrip(".") or type(e).__name__
