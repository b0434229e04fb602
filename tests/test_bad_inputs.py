"""A corpus of bad and awkward inputs mixed with good images: every good image is used, every
bad one is skipped with a reason, and a decompression bomb never gets decoded."""

import io
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from ray_galaxy.data import BadImage, decode_image
from ray_galaxy.prepare import PrepareConfig, prepare
from ray_galaxy.streaming import load_datasets
from synthetic import galaxy, jpeg_bytes


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bomb(side: int = 30000) -> bytes:
    """A valid PNG header declaring side x side pixels (a decompression bomb by its header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated() -> bytes:
    """A 60x40 photo, left half white, with EXIF orientation 6 (display rotated 90 degrees CW)."""
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    return _save(img, "JPEG", exif=exif.tobytes(), quality=95)


def corpus() -> tuple[dict[str, bytes], dict[str, bytes]]:
    rng = np.random.default_rng(9)
    g = galaxy(64, rng)
    good_full = jpeg_bytes(galaxy(64, rng))
    grey16 = Image.fromarray(np.asarray(Image.fromarray(g).convert("L"), np.uint16) * 257)
    rgba = np.dstack([g, np.full(g.shape[:2], 255, np.uint8)])
    good = {
        "plain.png": _save(Image.fromarray(g), "PNG"),
        "plain.jpg": good_full,
        "sixteen_bit.png": _save(grey16, "PNG"),
        "greyscale.png": _save(Image.fromarray(g).convert("L"), "PNG"),
        "rgba.png": _save(Image.fromarray(rgba, "RGBA"), "PNG"),
        "cmyk.jpg": _save(Image.fromarray(g).convert("CMYK"), "JPEG"),
        "palette.png": _save(Image.fromarray(g).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "exif_rotated.jpg": exif_rotated(),
        "webp.webp": _save(Image.fromarray(g), "WEBP", lossless=True),
    }
    bad = {
        "empty.jpg": b"",
        "truncated.jpg": good_full[: len(good_full) // 3],
        "text.jpg": b"hello, I am not a picture\n",
        "one_pixel.png": _save(Image.new("RGB", (1, 1)), "PNG"),
        "bomb.png": png_bomb(),
    }
    return good, bad


EXPECTED_REASON = {"empty.jpg": "unreadable", "truncated.jpg": "unreadable", "text.jpg": "unreadable",
                   "one_pixel.png": "too_small", "bomb.png": "too_large"}


def test_each_good_input_decodes_to_rgb_and_each_bad_one_names_its_reason():
    good, bad = corpus()
    for name, data in good.items():
        out = decode_image(data, 32)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8, name
        assert out.max() > 100, f"{name} lost its content"
    for name, data in bad.items():
        with pytest.raises(BadImage) as e:
            decode_image(data, 32)
        assert e.value.reason == EXPECTED_REASON[name], name


def test_greyscale_and_sixteen_bit_become_grey_rgb():
    good, _ = corpus()
    for name in ("greyscale.png", "sixteen_bit.png"):
        out = decode_image(good[name], 32).astype(int)
        assert np.abs(out[..., 0] - out[..., 1]).max() <= 1 and np.abs(out[..., 1] - out[..., 2]).max() <= 1


def test_exif_orientation_is_applied():
    out = decode_image(exif_rotated(), 40).astype(int)
    # white was the left half; after a 90-degree clockwise turn it is the top half
    assert out[:15].mean() > 200 and out[-15:].mean() < 50


def test_decompression_bomb_is_refused_within_a_memory_bound():
    """Decoding 30000x30000 pixels would need 2.7 GB; the header check refuses it under 1 GB."""
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from ray_galaxy.data import decode_image, BadImage\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "try:\n    decode_image(data, 64)\nexcept BadImage as e:\n    print(e.reason)\n"
    )
    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        f.write(png_bomb())
        f.flush()
        r = subprocess.run([sys.executable, "-c", code, f.name], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "too_large"


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("badcorpus")
    good, bad = corpus()
    for name, data in {**good, **bad}.items():
        (root / name).write_bytes(data)
    return root, good, bad


def test_training_data_uses_every_good_image_and_counts_each_bad_one(ray_address, bad_folder):
    root, good, bad = bad_folder
    train, val, stats = load_datasets(str(root), 32, 1.0, 0.3)
    assert stats.train_images + stats.val_images == len(good)
    assert stats.skipped == len(bad)
    assert stats.skipped_by_reason == {"unreadable": 3, "too_small": 1, "too_large": 1}


def test_prepare_counts_every_bad_input_in_the_manifest(ray_address, bad_folder, tmp_path):
    root, good, bad = bad_folder
    m = prepare(PrepareConfig(input=str(root), output=str(tmp_path / "out"), image_size=32, crop=1.0,
                              min_size=8))
    assert m["read"] == len(good) + len(bad) and m["written"] == len(good)
    assert m["dropped"] == {"unreadable": 3, "too_small": 1, "too_large": 1}
