"""Image validation: formats, data URIs, corrupt data and pixel bombs."""

from __future__ import annotations

import base64
import functools
import io
import struct
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from foveal.config import LimitsSettings
from foveal.errors import InvalidRequest
from foveal.router import images
from foveal.router.images import image_from_bytes, image_from_data_uri, load_image
from foveal.router.requests import RawImage

PARAM = "messages[0].content[1].image_url"
LIMITS = LimitsSettings()


def encode(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, fmt)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


@functools.cache
def crafted_png(width: int, height: int, *, pixel_data: bool = True) -> bytes:
    """An 8-bit greyscale PNG of zeros, compressed row by row (never held decoded in memory)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    if pixel_data:
        comp = zlib.compressobj(9)
        row = bytes(1 + width)  # filter byte + one byte per pixel
        idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
        out += png_chunk(b"IDAT", idat)
    return out + png_chunk(b"IEND", b"")


def expect_invalid(
    code: str, fn: Callable[..., object], *args: Any, **kwargs: Any
) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value.message
    assert info.value.param == PARAM
    assert info.value.message
    return info.value


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Records every decode (ImageFile.load) while still performing it."""
    calls: list[object] = []
    original = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> Any:
        calls.append(self)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


# --- accepted images ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")],
)
def test_each_supported_format_is_accepted(fmt: str, mime: str, load_calls: list[object]) -> None:
    data = encode(fmt, (40, 30))
    part = image_from_bytes(data, LIMITS, param=PARAM)
    assert (part.mime, part.width, part.height, part.nbytes) == (mime, 40, 30, len(data))
    assert part.pixels == 1200
    assert part.data_uri == data_uri(data, mime)  # built from the detected format
    assert len({id(c) for c in load_calls}) == 1  # really decoded (the preview reuses it)


def test_data_uri_is_kept_as_sent() -> None:
    uri = data_uri(encode("PNG", (8, 9)))
    part = image_from_data_uri(uri, LIMITS, param=PARAM)
    assert part.data_uri is uri
    assert (part.mime, part.width, part.height) == ("image/png", 8, 9)


def test_declared_type_may_disagree_with_content_and_the_content_wins() -> None:
    uri = data_uri(encode("JPEG", (16, 12)), "image/png")
    part = image_from_data_uri(uri, LIMITS, param=PARAM)
    assert part.mime == "image/jpeg"
    assert part.data_uri is uri


def test_data_uri_prefix_is_case_insensitive_and_may_carry_parameters() -> None:
    b64 = base64.b64encode(encode("GIF")).decode()
    for uri in (f"DATA:IMAGE/GIF;BASE64,{b64}", f"data:image/gif;name=a.gif;base64,{b64}"):
        assert image_from_data_uri(uri, LIMITS, param=PARAM).mime == "image/gif"


def test_jpeg_is_decoded_in_draft_mode_but_reports_its_real_size(
    load_calls: list[object],
) -> None:
    part = image_from_bytes(encode("JPEG", (2048, 1024)), LIMITS, param=PARAM)
    assert (part.width, part.height) == (2048, 1024)
    im = load_calls[0]
    assert isinstance(im, Image.Image) and all(c is im for c in load_calls)  # one decode
    assert im.size == (512, 256)  # decoded at 1/4 scale: no side below 256


def test_animated_gif_is_accepted() -> None:
    frames = [Image.new("P", (20, 10), color) for color in (1, 2, 3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    part = image_from_bytes(buf.getvalue(), LIMITS, param=PARAM)
    assert (part.mime, part.width, part.height) == ("image/gif", 20, 10)


def test_crafted_png_helper_builds_valid_images() -> None:
    part = image_from_bytes(crafted_png(64, 32), LIMITS, param=PARAM)
    assert (part.mime, part.width, part.height) == ("image/png", 64, 32)


# --- refused images ----------------------------------------------------------------------


def test_text_bytes_are_not_an_image() -> None:
    expect_invalid("invalid_image", image_from_bytes, b"hello, world" * 10, LIMITS, param=PARAM)


def test_empty_bytes_are_not_an_image() -> None:
    expect_invalid("invalid_image", image_from_bytes, b"", LIMITS, param=PARAM)


def test_unsupported_format_is_refused_by_content() -> None:
    bmp = encode("BMP")
    expect_invalid("invalid_image", image_from_bytes, bmp, LIMITS, param=PARAM)
    # declaring a supported type does not help
    expect_invalid("invalid_image", image_from_data_uri, data_uri(bmp), LIMITS, param=PARAM)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_images_are_refused(fmt: str, keep: float) -> None:
    data = encode(fmt, (64, 64))
    cut = data[: int(len(data) * keep)]
    expect_invalid("invalid_image", image_from_bytes, cut, LIMITS, param=PARAM)


def test_corrupt_png_data_is_refused() -> None:
    data = bytearray(encode("PNG", (64, 64)))
    idat = data.index(b"IDAT")
    data[idat + 20 : idat + 40] = b"\xff" * 20
    expect_invalid("invalid_image", image_from_bytes, bytes(data), LIMITS, param=PARAM)


@pytest.mark.parametrize(
    "uri",
    [
        "data:image/png;base64,not*base64!",
        "data:image/png;base64,iVBORw0KGgo",  # bad padding
        "data:image/png;base64,iVBO Rw0K",  # whitespace
        "data:image/png;base64,",  # empty
        "data:image/png;base64,héllo",  # not ASCII
    ],
)
def test_bad_base64_is_refused(uri: str) -> None:
    expect_invalid("invalid_image", image_from_data_uri, uri, LIMITS, param=PARAM)


@pytest.mark.parametrize(
    "uri",
    [
        "data:text/plain;base64,aGVsbG8=",  # not an image type
        "data:;base64,aGVsbG8=",  # no type
        "data:image/png,rawbytes",  # not base64
        "data:image/png;base64",  # no comma
        "https://example.com/a.png",  # not a data URI at all
    ],
)
def test_malformed_data_uris_are_refused(uri: str) -> None:
    expect_invalid("invalid_image_url", image_from_data_uri, uri, LIMITS, param=PARAM)


# --- pixel limits and bombs ----------------------------------------------------------------


def test_png_pixel_bomb_is_refused_before_decoding(load_calls: list[object]) -> None:
    bomb = crafted_png(8000, 8000)  # 64 Mpx: 61 MiB once decoded
    assert len(bomb) < 100 * 1024
    err = expect_invalid("image_too_large", image_from_bytes, bomb, LIMITS, param=PARAM)
    assert "8000x8000" in err.message
    assert load_calls == []


def test_pixel_limit_is_checked_from_the_header_alone(load_calls: list[object]) -> None:
    # no pixel data at all: decoding would fail as truncated, so refusing it as too large
    # shows the verdict came from the header
    header_only = crafted_png(8000, 8000, pixel_data=False)
    expect_invalid("image_too_large", image_from_bytes, header_only, LIMITS, param=PARAM)
    assert load_calls == []
    small_header_only = crafted_png(80, 80, pixel_data=False)
    expect_invalid("invalid_image", image_from_bytes, small_header_only, LIMITS, param=PARAM)


def test_jpeg_declaring_a_huge_canvas_is_refused_before_decoding(
    load_calls: list[object],
) -> None:
    data = bytearray(encode("JPEG", (16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)  # height, width
    expect_invalid("image_too_large", image_from_bytes, bytes(data), LIMITS, param=PARAM)
    assert load_calls == []


def test_exactly_at_the_limit_is_accepted_and_one_row_more_is_not() -> None:
    limits = LimitsSettings(max_image_pixels=100 * 50)
    assert image_from_bytes(encode("PNG", (100, 50)), limits, param=PARAM).pixels == 5000
    expect_invalid(
        "image_too_large", image_from_bytes, encode("PNG", (100, 51)), limits, param=PARAM
    )


def test_pillows_own_bomb_error_becomes_invalid_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # errors above 2000 pixels
    limits = LimitsSettings(max_image_pixels=10**9)
    expect_invalid(
        "image_too_large", image_from_bytes, encode("PNG", (100, 100)), limits, param=PARAM
    )


def test_pillows_bomb_warning_cannot_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # warns between 6000 and 12000
    limits = LimitsSettings(max_image_pixels=10**9)
    data = encode("PNG", (100, 100))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the strictest setting a process may run with
        expect_invalid("image_too_large", image_from_bytes, data, limits, param=PARAM)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert image_from_bytes(data, limits, param=PARAM).pixels == 10_000
    assert seen == []


# --- load_image ------------------------------------------------------------------------------


async def test_load_image_from_bytes_ignores_the_declared_mime() -> None:
    data = encode("WEBP", (12, 10))
    part = await load_image(RawImage(data=data, mime="image/png"), LIMITS, None, param=PARAM)
    assert (part.mime, part.width, part.height) == ("image/webp", 12, 10)
    assert part.data_uri == data_uri(data, "image/webp")


async def test_load_image_from_a_data_uri() -> None:
    uri = data_uri(encode("PNG", (5, 7)))
    part = await load_image(RawImage(url=uri), LIMITS, None, param=PARAM)
    assert part.data_uri is uri
    assert (part.width, part.height) == (5, 7)


def flat_png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["many bytes", "many pixels"])
async def test_load_image_validates_large_images_off_the_event_loop(kind: str) -> None:
    size = (400, 400) if kind == "many bytes" else (1500, 1000)
    data = encode("PNG", size) if kind == "many bytes" else flat_png(size)
    assert (len(data) > images._INLINE_MAX_BYTES) == (kind == "many bytes")
    part = await load_image(RawImage(data=data), LIMITS, None, param=PARAM)
    assert (part.width, part.height) == size
    uri = data_uri(data)
    part = await load_image(RawImage(url=uri), LIMITS, None, param=PARAM)
    assert part.data_uri is uri
    with pytest.raises(InvalidRequest) as info:
        await load_image(RawImage(data=data[: len(data) // 2]), LIMITS, None, param=PARAM)
    assert info.value.code == "invalid_image"


async def test_load_image_refuses_http_urls_when_fetching_is_disabled() -> None:
    with pytest.raises(InvalidRequest) as info:
        await load_image(RawImage(url="https://example.com/cat.png"), LIMITS, None, param=PARAM)
    assert info.value.code == "image_url_not_allowed"
    assert info.value.param == PARAM
    assert "data:" in info.value.message


@pytest.mark.parametrize(
    "url", ["ftp://example.com/a.png", "file:///etc/passwd", "cat.png", "javascript:alert(1)"]
)
async def test_load_image_refuses_other_schemes(url: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        await load_image(RawImage(url=url), LIMITS, None, param=PARAM)
    assert info.value.code == "invalid_image_url"
    assert info.value.param == PARAM


async def test_load_image_needs_a_url_or_data() -> None:
    with pytest.raises(InvalidRequest) as info:
        await load_image(RawImage(), LIMITS, None, param=PARAM)
    assert info.value.code == "invalid_image"


async def test_load_image_refuses_a_pixel_bomb() -> None:
    with pytest.raises(InvalidRequest) as info:
        await load_image(RawImage(data=crafted_png(8000, 8000)), LIMITS, None, param=PARAM)
    assert info.value.code == "image_too_large"


def test_module_exports() -> None:
    assert set(images.__all__) == {"image_from_bytes", "image_from_data_uri", "load_image"}
