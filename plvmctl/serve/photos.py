"""A request's photos: `data:` URLs, and local files when the server was given a photo folder.

Every photo is opened by images.image_from_bytes, as `plvmctl ask` opens a file (the same
pixels reach the model), within the server's limits: too many bytes or pixels is a 413, a
photo that does not decode a 400. A local path is read only inside the allowed folder (after
resolving `..` and symbolic links); without a folder, paths are refused.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from ..errors import PlvmError
from ..images import ImageTooLarge, image_from_bytes
from .faults import bad_request, too_large
from .settings import ServeSettings


def photo_from_url(url: str, settings: ServeSettings, photo_folder: Path | None,
                   param: str = "messages") -> Image.Image:
    """The photo an `image_url` names: a base64 `data:` URL, or a path (or file:// URL) in
    `photo_folder`."""
    if not isinstance(url, str) or not url:
        raise bad_request("image_url.url must be a non-empty string", param)
    if url.startswith("data:"):
        data = _data_url_bytes(url, settings, param)
        label = "the data: URL's photo"
    else:
        data, label = _local_file_bytes(url, settings, photo_folder, param)
    try:
        return image_from_bytes(data, label, max_pixels=settings.max_image_pixels)
    except ImageTooLarge as error:
        raise too_large(str(error), param) from None
    except PlvmError as error:
        raise bad_request(str(error), param, "invalid_image") from None


def _data_url_bytes(url: str, settings: ServeSettings, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise bad_request("image data: URLs must be base64 (data:image/png;base64,...)", param, "invalid_image")
    # base64 is 4/3 of the bytes: refuse before decoding what would be too many
    if len(payload) > 4 * (settings.max_image_bytes // 3 + 1):
        raise too_large(f"image larger than {settings.max_image_bytes:,} bytes", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("image data: URL is not valid base64", param, "invalid_image") from None
    if len(data) > settings.max_image_bytes:
        raise too_large(f"image larger than {settings.max_image_bytes:,} bytes", param)
    return data


def _local_file_bytes(url: str, settings: ServeSettings, photo_folder: Path | None,
                      param: str) -> tuple[bytes, str]:
    if photo_folder is None:
        raise bad_request("image_url must be a data: URL (this server reads no local files; start it "
                          "with --photos DIR to allow paths in DIR)", param, "invalid_image")
    parsed = urlparse(url)
    if parsed.scheme not in ("", "file"):
        raise bad_request(f"image_url scheme {parsed.scheme!r} is not served: use a data: URL "
                          "or a path in the server's photo folder", param, "invalid_image")
    relative = unquote(parsed.path) if parsed.scheme == "file" else url
    root = photo_folder.resolve()
    path = (root / relative).resolve()  # an absolute path replaces root; checked below
    if path != root and root not in path.parents:
        raise bad_request("image path is outside the server's photo folder", param, "invalid_image")
    if not path.is_file():
        raise bad_request(f"no photo {relative!r} in the server's photo folder", param, "invalid_image")
    if path.stat().st_size > settings.max_image_bytes:
        raise too_large(f"image larger than {settings.max_image_bytes:,} bytes", param)
    return path.read_bytes(), relative
