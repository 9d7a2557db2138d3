"""Image input: sources, colour modes, and parity with transformers' Gemma 3n image processor.

The reference is built the way `Gemma3nProcessor.from_pretrained` builds its image
processor: `AutoImageProcessor` reading Gemma 3n's published preprocessor settings.
Parity with its PIL backend is exact (max |delta| = 0); its torchvision backend (the
default when torchvision is installed) may differ by one grey level, 1/255.
"""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from mlx_gemma3n.processing.image import ImageError, load_image, preprocess_image, preprocess_images

transformers = pytest.importorskip("transformers")

# Gemma 3n's published preprocessor_config.json (image part).
GEMMA3N_PREPROCESSOR = {
    "image_processor_type": "SiglipImageProcessorFast",
    "processor_class": "Gemma3nProcessor",
    "do_resize": True,
    "size": {"height": 768, "width": 768},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": False,
    "image_mean": [0.0, 0.0, 0.0],
    "image_std": [1.0, 1.0, 1.0],
    "default_to_square": False,
}
ONE_LEVEL = 1 / 255


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3n")
    (path / "preprocessor_config.json").write_text(json.dumps(GEMMA3N_PREPROCESSOR))
    return path


@pytest.fixture(scope="module")
def reference_pil(checkpoint_dir):
    processor = transformers.AutoImageProcessor.from_pretrained(checkpoint_dir, backend="pil")
    assert type(processor).__name__ == "SiglipImageProcessorPil"
    return processor


@pytest.fixture(scope="module")
def reference_default(checkpoint_dir):
    return transformers.AutoImageProcessor.from_pretrained(checkpoint_dir)


def reference_pixels(processor, image) -> np.ndarray:
    pixels = processor(image, return_tensors="np")["pixel_values"][0]
    return np.transpose(pixels, (1, 2, 0))  # channels first -> last


def assert_exact(ours, theirs):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.float32
    worst = float(np.abs(ours.astype(np.float64) - theirs).max())
    assert worst == 0.0, f"max |delta| = {worst:.3g} ({worst * 255:.3g} grey levels)"


# --- test pictures, all drawn here ---------------------------------------------------


def gradient(height, width):
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 127 + 127 * np.sin(x / 7.0 + y / 11.0)], -1
    )
    return Image.fromarray(np.round(rgb).astype(np.uint8))


def noisy_gradient(height, width, seed=0):
    noise = np.random.default_rng(seed).normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(gradient(height, width)) + noise, 0, 255).astype(np.uint8))


def text_card(height=300, width=500):
    image = gradient(height, width)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=28)
    draw.text((10, 20), "Gemma 3n reads this", fill=(0, 0, 0), font=font)
    draw.text((10, 120), "0123456789 !?#", fill=(255, 255, 255), font=font)
    draw.rectangle((300, 200, 480, 280), outline=(255, 0, 0), width=3)
    return image


def rgba_picture(height=240, width=320):
    rgb = np.asarray(noisy_gradient(height, width, seed=1))
    alpha = np.round(np.linspace(0, 255, width))[None, :].repeat(height, 0).astype(np.uint8)
    alpha[: height // 4] = 0  # fully transparent band with non-white hidden colours
    return Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")


def encoded(image, fmt, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width, height) -> bytes:
    """A PNG that claims a size but holds no pixels: pillow checks the size on open."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


# --- parity with the reference ---------------------------------------------------------

PICTURES = {
    "gradient": lambda: gradient(480, 640),
    "text": text_card,
    "odd_size_37x1001": lambda: noisy_gradient(37, 1001),
    "tall_1001x37": lambda: noisy_gradient(1001, 37, seed=2),
    "tiny_5x7_upscaled": lambda: noisy_gradient(5, 7, seed=3),
    "exactly_768": lambda: noisy_gradient(768, 768, seed=4),
    "greyscale": lambda: noisy_gradient(200, 300).convert("L"),
    "black_and_white": lambda: noisy_gradient(200, 300).convert("1"),
    "palette": lambda: text_card().convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
    "cmyk": lambda: noisy_gradient(200, 300).convert("CMYK"),
    "rgba": rgba_picture,
    "greyscale_alpha": lambda: rgba_picture().convert("LA"),
}


@pytest.mark.parametrize("name", PICTURES)
def test_pixels_equal_reference_pil_backend_exactly(name, reference_pil):
    image = PICTURES[name]()
    assert_exact(preprocess_image(image), reference_pixels(reference_pil, image))


@pytest.mark.parametrize("name", ["gradient", "text", "odd_size_37x1001", "rgba", "cmyk"])
def test_pixels_within_one_grey_level_of_reference_torchvision_backend(name, reference_default):
    image = PICTURES[name]()
    worst = float(np.abs(preprocess_image(image) - reference_pixels(reference_default, image)).max())
    assert worst <= ONE_LEVEL + 1e-6, f"max |delta| = {worst:.3g} ({worst * 255:.3g} grey levels)"


def test_pixels_are_channels_last_float32_in_unit_range():
    pixels = preprocess_image(text_card())
    assert pixels.shape == (768, 768, 3) and pixels.dtype == np.float32
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0


def test_size_is_height_then_width():
    assert preprocess_image(gradient(50, 60), size=(32, 48)).shape == (32, 48, 3)


def test_palette_with_transparent_index_is_composited_onto_white(reference_pil):
    image = Image.new("P", (40, 30), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.paste(1, (0, 0, 20, 30))
    image.info["transparency"] = 0
    pixels = preprocess_image(image, size=(30, 40))
    assert np.all(pixels[:, 25:] == 1.0)  # transparent index -> white
    assert_exact(preprocess_image(image), reference_pixels(reference_pil, image))


def test_transparent_pixels_become_white_whatever_colour_they_hide():
    pixels = np.zeros((10, 10, 4), np.uint8)
    pixels[..., 0] = 200  # hidden red under alpha 0
    assert np.all(preprocess_image(Image.fromarray(pixels, "RGBA"), size=(10, 10)) == 1.0)


# --- EXIF orientation ---------------------------------------------------------------------


def rotated_exif_jpeg(tmp_path):
    """A 120x200 (h x w) picture stored rotated, with EXIF orientation 6 (rotate 90 cw to view)."""
    upright = text_card(120, 200)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a sideways camera writes
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def test_exif_orientation_is_applied(tmp_path):
    path = rotated_exif_jpeg(tmp_path)
    assert Image.open(path).size == (120, 200)  # as stored: width 120, height 200
    assert load_image(path).size == (200, 120)  # as seen: width 200, height 120


def test_exif_rotated_jpeg_path_equals_reference_given_the_path(tmp_path, reference_pil):
    path = rotated_exif_jpeg(tmp_path)
    assert_exact(preprocess_image(path), reference_pixels(reference_pil, str(path)))


def test_exif_orientation_is_applied_to_pil_images_too(tmp_path):
    path = rotated_exif_jpeg(tmp_path)
    assert np.array_equal(preprocess_image(Image.open(path)), preprocess_image(path))


# --- sources --------------------------------------------------------------------------------


@pytest.fixture
def png_file(tmp_path):
    path = tmp_path / "picture.png"
    noisy_gradient(90, 130).save(path)
    return path


def test_path_str_bytes_file_url_and_data_url_give_the_same_pixels(png_file):
    import base64

    expected = preprocess_image(Image.open(png_file), size=(64, 64))
    data = png_file.read_bytes()
    sources = [
        png_file,
        str(png_file),
        data,
        png_file.as_uri(),
        "data:image/png;base64," + base64.b64encode(data).decode(),
    ]
    for source in sources:
        assert np.array_equal(preprocess_image(source, size=(64, 64)), expected), repr(source)[:60]


def test_uint8_array_equals_reference(reference_pil):
    array = np.asarray(noisy_gradient(37, 1001))
    assert_exact(preprocess_image(array), reference_pixels(reference_pil, array))


def test_float_array_in_unit_range_is_read_as_rounded_levels():
    levels = np.asarray(noisy_gradient(20, 30))
    as_float = levels.astype(np.float32) / 255
    assert np.array_equal(preprocess_image(as_float, size=(16, 16)), preprocess_image(levels, size=(16, 16)))


def test_greyscale_and_rgba_arrays_are_accepted():
    grey = np.asarray(noisy_gradient(20, 30).convert("L"))
    assert np.array_equal(preprocess_image(grey, size=(8, 8)), preprocess_image(Image.fromarray(grey), size=(8, 8)))
    rgba = np.asarray(rgba_picture(20, 30))
    assert np.array_equal(preprocess_image(rgba, size=(8, 8)), preprocess_image(Image.fromarray(rgba), size=(8, 8)))


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits(tmp_path):
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    path = tmp_path / "deep.png"
    Image.fromarray(levels * 257).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_image(path))
    assert np.array_equal(pixels[..., 0], levels) and np.array_equal(pixels[..., 2], levels)


def test_several_images_stack_in_order():
    first, second = gradient(40, 50), text_card()
    batch = preprocess_images([first, second], size=(32, 32))
    assert batch.shape == (2, 32, 32, 3)
    assert np.array_equal(batch[1], preprocess_image(second, size=(32, 32)))


def test_load_image_returns_rgb():
    assert load_image(rgba_picture()).mode == "RGB"
    assert load_image(noisy_gradient(9, 9).convert("CMYK")).mode == "RGB"


# --- clear errors ---------------------------------------------------------------------------


def test_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(20000, 20000))
    with pytest.raises(ImageError, match=r"bomb.png is too large to decode safely"):
        load_image(path)


def test_image_in_pillows_warning_band_is_refused_too():
    pixels = Image.MAX_IMAGE_PIXELS + 1000  # above the warning limit, below the error limit
    with pytest.raises(ImageError, match=r"too large to decode safely"):
        load_image(png_header_only(pixels // 10000 + 1, 10000))


def test_file_that_is_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are words, not pixels")
    with pytest.raises(ImageError, match=r"notes.png is not an image file that pillow can read\.$"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image(tmp_path, fmt):
    data = encoded(noisy_gradient(200, 200), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ImageError, match=r"Could not decode .*cut\.\w+ \(.*\): the file may be truncated or corrupt\.$"
    ):
        load_image(path)


def test_unreachable_url():
    with pytest.raises(ImageError, match=r"^Could not fetch the image at http://127\.0\.0\.1:9/x\.png \(.+\)\.$"):
        load_image("http://127.0.0.1:9/x.png")


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"^Image file not found: .*nowhere\.jpg\.$"):
        load_image(tmp_path / "nowhere.jpg")


def test_folder_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match=r"is a folder, not an image file\.$"):
        load_image(tmp_path)


def test_unsupported_source_type():
    with pytest.raises(ImageError, match=r"^Cannot read an image from a int: pass a path"):
        load_image(42)


def test_float_array_outside_unit_range():
    with pytest.raises(ImageError, match=r"^A float image array must hold values in \[0, 1\]"):
        load_image(np.full((4, 4, 3), 200.0))


def test_array_of_the_wrong_shape():
    with pytest.raises(ImageError, match=r"array of shape \(3, 4, 5\): expected"):
        load_image(np.zeros((3, 4, 5), np.uint8))


def test_errors_are_value_errors():
    assert issubclass(ImageError, ValueError)
