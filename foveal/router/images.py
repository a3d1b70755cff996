"""Turn the images a request carries into validated :class:`ImagePart` objects.

Every image is checked in two steps. The header is read first (``Image.open`` is lazy) and
the declared width x height is refused above ``limits.max_image_pixels`` before a single
pixel is decoded, so a small file declaring a huge canvas costs nothing. The image is then
really decoded, cheaply: JPEGs in draft mode (scaled down by up to 8 in the decoder), other
formats in full (bounded by the pixel limit). Large decodes run in a worker thread so that
one big PNG does not stall the event loop.

Only PNG, JPEG, WEBP and GIF are accepted, judged by content; a data URI's declared type may
disagree with the content, the detected type wins. Every failure is an ``InvalidRequest``
naming the offending field (``param``) with one of these codes:

- ``invalid_image_url``: not a ``data:``/``http(s):`` URL, or a malformed data URI;
- ``invalid_image``: bad base64, not an image, an unsupported format, truncated or corrupt data;
- ``image_too_large``: more pixels than allowed;
- ``image_url_not_allowed`` / ``image_fetch_failed``: see :mod:`foveal.router.image_urls`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import logging
import warnings
from typing import TYPE_CHECKING, cast

from PIL import Image, ImageFile, UnidentifiedImageError

from foveal.config import LimitsSettings
from foveal.errors import InvalidRequest
from foveal.router.features import preview_image
from foveal.router.requests import ImagePart, RawImage

if TYPE_CHECKING:
    from foveal.router.image_urls import ImageFetcher

__all__ = ["image_from_bytes", "image_from_data_uri", "load_image"]

logger = logging.getLogger(__name__)

# Pillow format name -> the MIME type the pool receives. MPO is a multi-picture JPEG.
_MIME_BY_FORMAT = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
}
_OPEN_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# JPEGs are decoded scaled down so that the result is at least this large (up to 1/8 scale).
_JPEG_DRAFT_SIZE = (256, 256)
# Images larger than this (encoded bytes, or decoded pixels) are validated in a worker thread
# rather than on the event loop; Pillow releases the GIL while it decodes.
_INLINE_MAX_BYTES = 256 * 1024
_INLINE_MAX_PIXELS = 1_000_000

# Our own pixel limit is checked from the header before anything is decoded, so Pillow's
# looser, process-wide guard is redundant: its warning is silenced here, and should it still
# fire (an error above twice its limit, or a warning under a "-W error" filter) it is caught
# below and reported as ``image_too_large``.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def image_from_bytes(
    data: bytes, limits: LimitsSettings, *, param: str, data_uri: str | None = None
) -> ImagePart:
    """Validate raw image bytes. ``data_uri`` is forwarded as is when given; otherwise one is
    built from the detected format."""
    im, part = _probe(data, limits, param=param, data_uri=data_uri)
    try:
        preview = _decode(im, param=param)
    finally:
        im.close()
    return dataclasses.replace(part, preview=preview)


def image_from_data_uri(uri: str, limits: LimitsSettings, *, param: str) -> ImagePart:
    """Validate a ``data:image/<type>;base64,<payload>`` URI; the URI itself is kept as is."""
    return image_from_bytes(_decode_data_uri(uri, param=param), limits, param=param, data_uri=uri)


async def load_image(
    raw: RawImage, limits: LimitsSettings, fetcher: ImageFetcher | None, *, param: str
) -> ImagePart:
    """Validate one image as an edge received it: bytes, a data URI, or an http(s) URL
    (fetched with ``fetcher``; ``None`` means remote URLs are disabled)."""
    if raw.data is not None:
        return await _validate(raw.data, limits, param=param, data_uri=None)
    url = raw.url
    if not url:
        raise InvalidRequest("image has neither a URL nor data", param=param, code="invalid_image")
    scheme = url.split(":", 1)[0].strip().lower() if ":" in url else ""
    if scheme == "data":
        if len(url) > _INLINE_MAX_BYTES:
            return await asyncio.to_thread(image_from_data_uri, url, limits, param=param)
        return await _validate(
            _decode_data_uri(url, param=param), limits, param=param, data_uri=url
        )
    if scheme in ("http", "https"):
        if fetcher is None:
            raise InvalidRequest(
                "remote image URLs are disabled on this server; send the image inline as a "
                "data: URI (data:image/png;base64,...)",
                param=param,
                code="image_url_not_allowed",
            )
        data = await fetcher.fetch(url, param=param)
        return await _validate(data, limits, param=param, data_uri=None)
    raise InvalidRequest(
        "image URL must be a data: URI (data:image/png;base64,...) or an http(s) URL",
        param=param,
        code="invalid_image_url",
    )


async def _validate(
    data: bytes, limits: LimitsSettings, *, param: str, data_uri: str | None
) -> ImagePart:
    if len(data) > _INLINE_MAX_BYTES:
        return await asyncio.to_thread(
            image_from_bytes, data, limits, param=param, data_uri=data_uri
        )
    im, part = _probe(data, limits, param=param, data_uri=data_uri)
    try:
        if im.width * im.height > _INLINE_MAX_PIXELS:  # after JPEG draft: the decoded size
            preview = await asyncio.to_thread(_decode, im, param=param)
        else:
            preview = _decode(im, param=param)
    finally:
        im.close()
    return dataclasses.replace(part, preview=preview)


def _decode_data_uri(uri: str, *, param: str) -> bytes:
    head, sep, payload = uri.partition(",")
    if not sep or not head[:5].lower() == "data:":
        raise InvalidRequest(
            "malformed data URI; expected data:image/<png|jpeg|webp|gif>;base64,<data>",
            param=param,
            code="invalid_image_url",
        )
    mime, *params = (p.strip().lower() for p in head[5:].split(";"))
    if not mime.startswith("image/"):
        raise InvalidRequest(
            f"data URI type {mime or '(none)'!r} is not an image; "
            "expected image/png, image/jpeg, image/webp or image/gif",
            param=param,
            code="invalid_image_url",
        )
    if not params or params[-1] != "base64":
        raise InvalidRequest(
            "data URI must be base64-encoded (data:image/<type>;base64,<data>)",
            param=param,
            code="invalid_image_url",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            "data URI payload is not valid base64", param=param, code="invalid_image"
        ) from None
    if not data:
        raise InvalidRequest("data URI payload is empty", param=param, code="invalid_image")
    return data


def _probe(
    data: bytes, limits: LimitsSettings, *, param: str, data_uri: str | None
) -> tuple[ImageFile.ImageFile, ImagePart]:
    """Read the header only: format, size, the pixel limit. Nothing is decoded here."""
    try:
        im = cast(ImageFile.ImageFile, Image.open(io.BytesIO(data), formats=_OPEN_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequest(
            f"image declares too many pixels ({exc})", param=param, code="image_too_large"
        ) from None
    except UnidentifiedImageError:
        raise InvalidRequest(
            "not a supported image; send PNG, JPEG, WEBP or GIF", param=param, code="invalid_image"
        ) from None
    except Exception as exc:  # any parser failure on hostile input is the client's error
        logger.debug("image header unreadable: %r", exc)
        raise InvalidRequest(
            "image data is corrupt or truncated", param=param, code="invalid_image"
        ) from None
    width, height = im.size
    mime = _MIME_BY_FORMAT.get(im.format or "")
    if mime is None or width <= 0 or height <= 0:
        im.close()
        raise InvalidRequest(
            "not a supported image; send PNG, JPEG, WEBP or GIF", param=param, code="invalid_image"
        )
    if width * height > limits.max_image_pixels:
        im.close()
        raise InvalidRequest(
            f"image is {width}x{height} = {width * height} pixels; "
            f"at most {limits.max_image_pixels} are allowed",
            param=param,
            code="image_too_large",
        )
    if mime == "image/jpeg":
        im.draft("RGB", _JPEG_DRAFT_SIZE)  # shrinks im.size to what the decoder will produce
    if data_uri is None:
        data_uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    part = ImagePart(data_uri=data_uri, mime=mime, width=width, height=height, nbytes=len(data))
    return im, part


def _decode(im: ImageFile.ImageFile, *, param: str) -> Image.Image | None:
    """Decode the (first frame of the) image; any failure means the data is unusable.

    Returns the small preview the routing features read (so the image is decoded only once)."""
    try:
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequest(
            f"image declares too many pixels ({exc})", param=param, code="image_too_large"
        ) from None
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, ... on bad data
        logger.debug("image decode failed: %r", exc)
        raise InvalidRequest(
            "image data is corrupt or truncated", param=param, code="invalid_image"
        ) from None
    try:
        return preview_image(im)
    except Exception as exc:  # an odd mode the preview cannot convert: features decode again
        logger.debug("image preview failed: %r", exc)
        return None
