"""Every odd photo becomes an upright RGB image or a one-line PlvmError."""

import pytest

from plvmctl.errors import PlvmError
from plvmctl.images import MAX_SIDE, expand_to_square, load_image


@pytest.mark.parametrize("name", ["plain0.png", "photo.jpg", "rgba.png", "palette.png",
                                  "sixteen.png", "gray.png", "exif_rotated.jpg"])
def test_odd_modes_become_rgb(photos, name):
    image = load_image(photos[name])
    assert image.mode == "RGB"
    assert image.width > 0 and image.height > 0


def test_sixteen_bit_keeps_contrast(photos):
    image = load_image(photos["sixteen.png"])
    low, high = image.convert("L").getextrema()
    assert high - low > 200  # rescaled to the full 8-bit range, not clipped to white


def test_rgba_is_composited_on_white(photos):
    pixel = load_image(photos["rgba.png"]).getpixel((0, 0))
    assert min(pixel) >= 255 * (1 - 90 / 255) - 1  # mostly transparent → close to white


def test_exif_orientation_is_applied(photos):
    image = load_image(photos["exif_rotated.jpg"])
    assert image.size == (20, 40)  # stored 40x20, displayed rotated


def test_huge_photo_is_shrunk(photos):
    image = load_image(photos["huge.png"])
    assert max(image.size) == MAX_SIDE
    assert image.size == (MAX_SIDE, round(3000 * MAX_SIDE / 5000))


@pytest.mark.parametrize("name, words", [("corrupt.jpg", "corrupt"), ("text.png", "not a readable image"),
                                         ("missing.png", "not found")])
def test_bad_files_give_one_line_errors(photos, name, words):
    with pytest.raises(PlvmError) as caught:
        load_image(photos[name])
    message = str(caught.value)
    assert words in message and "\n" not in message and name in message


def test_expand_to_square_centres_with_fill(photos):
    image = load_image(photos["plain0.png"])  # 48 x 40
    square = expand_to_square(image, (1, 2, 3))
    assert square.size == (48, 48)
    assert square.getpixel((0, 0)) == (1, 2, 3)
    assert square.getpixel((10, 4)) == image.getpixel((10, 0))
