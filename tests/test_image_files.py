"""Reading users' PNG/JPEG files: exact pixels, stable order, one-line refusals."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dundi.errors import DundiError
from dundi.run.image_files import expand_paths, read_images


def _gray(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)
    return path


def _noise(seed: int, shape=(28, 28)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_png_pixels_are_k_over_255_exactly(tmp_path):
    raw = _noise(0)
    _gray(tmp_path / "a.png", raw)
    batch, names = read_images([str(tmp_path / "a.png")], (1, 28, 28))
    assert batch.dtype == np.float32 and batch.shape == (1, 1, 28, 28)
    np.testing.assert_array_equal(batch[0, 0], raw.astype(np.float32) / np.float32(255))
    assert names == [str(tmp_path / "a.png")]


def test_folder_is_sorted_recursive_and_glob_matches_the_same_files(tmp_path):
    for name in ["b.png", "a.png", "sub/c.png", "z.jpg"]:
        _gray(tmp_path / "imgs" / name, _noise(len(name)))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    _, names = read_images([str(tmp_path / "imgs")], (1, 28, 28))
    assert [Path(n).relative_to(tmp_path / "imgs").as_posix() for n in names] == \
        ["a.png", "b.png", "sub/c.png", "z.jpg"]
    _, globbed = read_images([str(tmp_path / "imgs" / "*.png")], (1, 28, 28))
    assert [Path(n).name for n in globbed] == ["a.png", "b.png"]


def test_a_file_named_twice_is_read_once_in_argument_order(tmp_path):
    a = _gray(tmp_path / "a.png", _noise(1))
    b = _gray(tmp_path / "b.png", _noise(2))
    files = expand_paths([str(b), str(tmp_path), str(a)])
    assert files == [b, a]


def test_rgb_becomes_luma_for_a_grayscale_run(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "c.png")
    batch, _ = read_images([str(tmp_path / "c.png")], (1, 28, 28))
    # ITU-R 601-2 luma, computed independently of Pillow; Pillow rounds in fixed point
    rgb = rgb.astype(np.int64)
    luma = (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114) / 1000 / 255
    assert np.abs(batch[0, 0] - luma).max() <= 1 / 255 + 1e-6


def test_grayscale_repeats_over_channels_for_an_rgb_run(tmp_path):
    raw = _noise(4, (32, 32))
    _gray(tmp_path / "g.png", raw)
    batch, _ = read_images([str(tmp_path / "g.png")], (3, 32, 32))
    for ch in range(3):
        np.testing.assert_array_equal(batch[0, ch], raw / np.float32(255))


def test_jpeg_is_read(tmp_path):
    raw = np.full((28, 28), 200, np.uint8)
    Image.fromarray(raw, mode="L").save(tmp_path / "j.jpeg", quality=95)
    batch, _ = read_images([str(tmp_path / "j.jpeg")], (1, 28, 28))
    assert np.abs(batch - 200 / 255).max() < 3 / 255  # a flat image survives JPEG nearly exactly


def test_sixteen_bit_png_keeps_its_scale(tmp_path):
    raw = np.linspace(0, 65535, 28 * 28).astype(np.uint16).reshape(28, 28)
    Image.fromarray(raw).save(tmp_path / "deep.png")
    batch, _ = read_images([str(tmp_path / "deep.png")], (1, 28, 28))
    np.testing.assert_allclose(batch[0, 0], raw / 65535.0, atol=1e-6)


def test_wrong_size_is_refused_naming_file_and_size_unless_resize(tmp_path):
    path = _gray(tmp_path / "big.png", _noise(5, (32, 40)))
    with pytest.raises(DundiError) as e:
        read_images([str(path)], (1, 28, 28))
    msg = str(e.value)
    assert str(path) in msg and "40x32" in msg and "28x28" in msg and "--resize" in msg
    assert "\n" not in msg
    batch, _ = read_images([str(path)], (1, 28, 28), resize=True)
    assert batch.shape == (1, 1, 28, 28) and 0 <= batch.min() and batch.max() <= 1


def test_flat_image_resized_stays_flat(tmp_path):
    path = _gray(tmp_path / "flat.png", np.full((56, 56), 51, np.uint8))
    batch, _ = read_images([str(path)], (1, 28, 28), resize=True)
    np.testing.assert_allclose(batch, 51 / 255, atol=1e-6)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n truncated", b"plain text"])
def test_unreadable_file_is_one_line_naming_it(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(DundiError) as e:
        read_images([str(path)], (1, 28, 28))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_paths_and_empty_matches_are_named(tmp_path):
    with pytest.raises(DundiError, match="no such file or folder"):
        read_images([str(tmp_path / "nope.png")], (1, 28, 28))
    with pytest.raises(DundiError, match="no PNG or JPEG file matches"):
        read_images([str(tmp_path / "*.png")], (1, 28, 28))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DundiError, match="holds no PNG or JPEG"):
        read_images([str(tmp_path / "empty")], (1, 28, 28))
