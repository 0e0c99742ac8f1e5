"""Pictures in (one helper for every path: EXIF, modes, bombs, strips, truncation) and PNGs out (atomic, exclusive,
with the umask's permissions), against diffusers' image loader where it is the reference."""

import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from mlx_qwen_image.image import open_image, save_png


def _pixels(w=48, h=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_exif_rotation_is_applied_as_diffusers_does(tmp_path):
    from diffusers.utils import load_image

    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(_pixels()).save(path, exif=exif, quality=95)
    ours = open_image(path)
    assert ours.size == (32, 48)  # turned upright
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(load_image(str(path))))


def test_16_bit_grey_is_scaled_where_diffusers_clips_it_to_white(tmp_path):
    from diffusers.utils import load_image

    grey = _pixels()[..., 0]
    path = tmp_path / "grey16.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)
    assert Image.open(path).mode == "I;16"
    ours = np.asarray(open_image(path))
    np.testing.assert_array_equal(ours, np.repeat(grey[..., None], 3, axis=2))
    theirs = np.asarray(load_image(str(path)))
    assert (theirs[grey > 0] == 255).all()  # the reference loader's picture is white wherever it is not black


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA"])
def test_other_modes_convert_as_diffusers_does(tmp_path, mode):
    from diffusers.utils import load_image

    path = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
    picture = Image.fromarray(_pixels()).convert(mode)
    if mode == "P":
        picture.info["transparency"] = 0
    picture.save(path)
    ours = open_image(path)
    # Transparency is kept (Qwen-Image 2.1 reads RGBA); as RGB it is diffusers' loader's picture.
    assert ours.mode == ("RGBA" if mode in ("P", "RGBA", "LA") else "RGB")
    np.testing.assert_array_equal(np.asarray(ours.convert("RGB")), np.asarray(load_image(str(path))))


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height (its pixels are never stored): what a decompression bomb shows."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def test_bombs_strips_and_truncated_files_get_one_line(tmp_path):
    bomb = _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(ValueError, match=r"picture .*bomb.png is larger than 100 megapixels \(a decompression bomb"):
        open_image(bomb)
    big = _png_header_only(tmp_path / "big.png", 12000, 9000)  # 108 Mpx: below PIL's own limit, above ours
    with pytest.raises(ValueError, match=r"big.png is 12000x9000, more than 100 megapixels"):
        open_image(big)
    Image.fromarray(np.zeros((10, 10000, 3), np.uint8)).save(tmp_path / "strip.png")
    with pytest.raises(ValueError, match=r"strip.png is 10000x10: an aspect ratio beyond 16:1"):
        open_image(tmp_path / "strip.png")
    Image.fromarray(_pixels(200, 200)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read image .*cut.png"):
        open_image(tmp_path / "cut.png")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_pngs_get_the_permissions_of_a_new_file(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_png(Image.fromarray(_pixels()), tmp_path / "out.png", {"seed": 1})
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out.png").st_mode & 0o777 == mode
    assert Image.open(tmp_path / "out.png").text["seed"] == "1"


def test_a_png_never_replaces_one_that_appeared_meanwhile(tmp_path):
    path = tmp_path / "out.png"
    save_png(Image.fromarray(_pixels(seed=1)), path)
    with pytest.raises(FileExistsError, match="appeared while this run was working"):
        save_png(Image.fromarray(_pixels(seed=2)), path)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), _pixels(seed=1))
    save_png(Image.fromarray(_pixels(seed=2)), path, overwrite=True)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), _pixels(seed=2))
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left


def test_two_processes_writing_one_output(tiny_checkpoint, tmp_path):
    """Two real CLI runs racing for one -o: exactly one writes it; the other says why and exits 1."""
    out = tmp_path / "same.png"
    command = [sys.executable, "-m", "mlx_qwen_image.cli", "generate", "x", "--model", str(tiny_checkpoint[0]),
               "--width", "32", "--height", "32", "--steps", "2", "--dtype", "float32", "--output", str(out)]
    runs = [subprocess.Popen(command + ["--seed", str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for seed in (1, 2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "appeared while this run was working" in loser or "already exists" in loser, loser
    assert "Traceback" not in loser
    winner = next(err for code, err in results if code == 0)
    assert Image.open(out).text["seed"] in winner
