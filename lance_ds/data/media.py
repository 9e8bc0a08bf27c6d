"""Media bytes <-> uint8 frames: image decode (PIL), video decode with frame sampling (PyAV), probing, encoding.

Every decoder returns RGB frames as a uint8 tensor [T, H, W, 3] (an image has T = 1) and raises `MediaError`,
naming what is wrong with the bytes, for anything it cannot read; callers count and report those samples.
The probes are what the converter's `--verify full` runs: `probe_image` decodes the whole image (a JPEG at 1/8
scale), `probe_video` opens the container, decodes the first frame and walks every packet (cheap: no decoding) so
that a truncated file is caught, and reads size, frame count, fps and duration.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import struct
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Iterator

import av
import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported inside the decoders only: the converter and its workers never need it,
    import torch  # and importing it costs ~2 s per process

# A frame may sit this far (seconds) before its sampling target and still count as on time: timestamps are
# rational numbers turned into floats, so 1/12 s can come out a hair early (see also `_on_time_tolerance`).
_TIME_EPS = 1e-6

# Decoder threads pay off from about this many pixels per frame; below, starting them costs more than they save
# (a 9 x 64 x 64 clip: 6.5 ms without, 8 ms with).
_THREADED_PIXELS = 256 * 256

# Transparent pixels are composited onto this background: their stored colour is arbitrary and often black.
_BACKGROUND = (255, 255, 255)


class MediaError(ValueError):
    """The bytes are not a readable image or video; the message says what is wrong with them."""


@dataclass
class ImageInfo:
    width: int  # pixels, after EXIF orientation
    height: int  # pixels, after EXIF orientation
    format: str  # PIL's name for the encoding, lower case: "jpeg", "png", "webp", ...


@dataclass
class VideoInfo:
    width: int  # pixels
    height: int  # pixels
    num_frames: int  # frames in the first video stream
    fps: float  # average frames per second
    duration: float  # seconds


# ----------------------------------------------------------------------------------------------------------------
# sniffing


def _unsigned(data) -> memoryview:
    """A byte view whose items are 0..255 (a memoryview exported by arrow holds signed chars)."""
    view = memoryview(data)
    return view if view.format == "B" else view.cast("B")


VIDEO_EXTENSIONS = ("mp4", "mov", "avi", "webm", "mkv", "ogv", "ts", "m2ts", "flv")  # those sniff_extension knows


def sniff_extension(data: bytes) -> str | None:
    """The file extension the bytes' magic number says ("jpg", "png", "mp4", ...), or None when unknown."""
    data = _unsigned(data)
    head = bytes(data[:64])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head[4:8] == b"ftyp":  # ISO base media: mp4, m4v, 3gp, QuickTime
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "avif"
        return "mov" if brand == b"qt  " else "mp4"
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"):  # QuickTime from before ftyp boxes
        return "mov"
    if head.startswith(b"FLV\x01"):
        return "flv"
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: Matroska or WebM
        return "webm" if b"webm" in bytes(data[:4096]) else "mkv"
    if head.startswith(b"OggS"):
        return "ogv"
    if len(data) >= 377 and data[0] == 0x47 and data[188] == 0x47 and data[376] == 0x47:  # MPEG-TS sync bytes
        return "ts"
    if len(data) >= 389 and data[4] == 0x47 and data[196] == 0x47 and data[388] == 0x47:  # 192-byte packets (Blu-ray)
        return "m2ts"
    return None


def describe(data: bytes, kind: str, full: bool = True) -> dict:
    """A medium's KEY.json entry ("image" or "video" bytes): format, bytes, width, height (+ frames, fps, duration).
    full: decode the image / probe every packet of the video (verification); else read headers only. Raises
    MediaError for unreadable bytes."""
    ext = sniff_extension(data)
    if kind == "image":
        info = probe_image(data) if full else peek_image(data)
        if ext in VIDEO_EXTENSIONS:  # an ISO-media image (HEIF / AVIF branded mif1, msf1, ...): as PIL reads it
            ext = None
        ext = ext or {"jpeg": "jpg"}.get(info.format, re.sub(r"[^a-z0-9]", "", info.format) or "bin")
        return {"format": ext, "bytes": len(data), "width": info.width, "height": info.height}
    info = probe_video(data) if full else peek_video(data)
    return {"format": ext or "bin", "bytes": len(data), "width": info.width, "height": info.height,
            "frames": info.num_frames, "fps": round(info.fps, 6), "duration": round(info.duration, 6)}


# ----------------------------------------------------------------------------------------------------------------
# images


def _open_image(data: bytes, decode: bool = True) -> Image.Image:
    """Open an image and decode it whole (the first frame of an animation), as stored (EXIF orientation not
    applied); decode=False reads the header only. Images too large to decode safely are refused either way."""
    if not len(data):
        raise MediaError("image bytes are empty")
    with _image_errors(data, "image header"):
        img = Image.open(io.BytesIO(data))
    if decode:
        _load(img, data)
    return img


def _load(img: Image.Image, data: bytes) -> None:
    """Decode every pixel of an opened image: a truncated file fails here, not later."""
    with _image_errors(data, "image"):
        img.load()


@contextlib.contextmanager
def _image_errors(data: bytes, what: str) -> Iterator[None]:
    """PIL's errors on `data` as MediaError, naming what could not be read; images too large to decode safely too."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaError(f"image is too large to decode safely: {e}") from None
    except MemoryError:  # this process's trouble, not the bytes': a re-run must try the row again
        raise
    except Exception as e:  # OSError, SyntaxError, ValueError: PIL's "not an image" / "truncated"; its decoders
        # also raise TypeError, IndexError, struct.error ... on damaged bytes: every one of them is bad input here
        raise MediaError(f"not a readable {what} ({len(data)} bytes, starts {bytes(data[:8])!r}): "
                         f"{_pil_reason(e)}{_heif_hint(data)}") from None


def _heif_hint(data: bytes) -> str:
    """HEIC (iPhone photos) is a format PIL reads only through a plugin this project does not install."""
    if bytes(data[4:8]) == b"ftyp" and bytes(data[8:12]) in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1",
                                                                b"msf1"):
        return "; a HEIC/HEIF image: convert it to JPEG, PNG or WebP first (e.g. `heif-convert`, or pillow-heif)"
    return ""


# EXIF orientation -> the turn that shows the image upright (2..8; 1 is upright already)
_ORIENTATION_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                      4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                      7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _orientation(img: Image.Image) -> int:
    """EXIF orientation 1..8 (1: upright; 5..8: turned by 90 degrees); 1 when absent or unreadable."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block (any of PIL's errors) does not make the pixels unusable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _pil_reason(error: Exception) -> str:
    """PIL's message without the BytesIO object's address (reject lists must be the same on every run)."""
    return re.sub(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>", "", str(error)) or type(error).__name__


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3]: alpha composited on white, 16-bit and float scaled to 8 bits, CMYK inverted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        gray = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or gray.max(initial=0) > 255 else 255.0
        if img.mode == "F" and gray.max(initial=0) <= 1.0:  # float images in [0, 1] (scientific TIFFs, EXR-like)
            top = 1.0
        gray = np.clip(gray / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)  # a new, writable array
    if "transparency" in img.info and img.mode in ("P", "RGB", "L"):  # a palette entry or colour key (tRNS)
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        img = Image.alpha_composite(background, rgba)
    return np.array(img.convert("RGB"), dtype=np.uint8)  # a copy: torch wants a writable array


def jpeg_decode_size(height: int, width: int, at_least: tuple[int, int]) -> tuple[int, int]:
    """The size `decode_image(..., at_least)` gives a height x width JPEG: shrunk by the largest of libjpeg's DCT
    scales (1/8, 1/4, 1/2) that keeps both sides at least at_least = (height, width)."""
    scale = _jpeg_scale(height, width, at_least)
    return -(-height // scale), -(-width // scale)


def _jpeg_scale(height: int, width: int, at_least: tuple[int, int]) -> int:
    return next((s for s in (8, 4, 2) if height // s >= at_least[0] and width // s >= at_least[1]), 1)


def decode_image(data: bytes, at_least: tuple[int, int] | None = None) -> torch.Tensor:
    """Encoded image bytes -> uint8 [1, H, W, 3] RGB (grayscale, RGBA, CMYK, palette and 16-bit converted).

    at_least (height, width as displayed): a JPEG larger than twice that is decoded shrunk (`jpeg_decode_size`),
    libjpeg skipping the detail a smaller picture cannot show: 2-3x faster for a photo cut to a quarter of its side.
    Other formats are decoded whole."""
    import torch

    img = _open_image(data, decode=False)
    if at_least is not None and img.format == "JPEG":
        turned = _orientation(img) >= 5  # (at_least is the displayed image's; the stored one is turned)
        want = at_least[::-1] if turned else at_least
        scale = _jpeg_scale(img.height, img.width, want)
        if scale > 1:  # (PIL picks the scale from the size asked for: each side's floor asks for exactly this one)
            img.draft(img.mode, (img.width // scale, img.height // scale))
    _load(img, data)
    try:
        turn = _ORIENTATION_TURNS.get(_orientation(img))
        if turn is not None:  # as a photo viewer shows it (not ImageOps.exif_transpose: it rewrites the EXIF block,
            img = img.transpose(turn)  # which fails on damaged EXIF that the orientation itself survives)
        pixels = _to_rgb(img)
    except MemoryError:
        raise
    except Exception as e:  # decoded, but its mode or metadata is damaged (PIL's errors, as in _open_image)
        raise MediaError(f"not a convertible image ({img.mode} {img.size}): {_pil_reason(e)}") from None
    return torch.from_numpy(pixels).unsqueeze(0)


def probe_image(data: bytes) -> ImageInfo:
    """Decode the whole image (verification) and report its size as `decode_image` returns it, and its encoding.

    A JPEG is decoded at 1/8 scale: all of its compressed data is still read and checked (where a damaged or cut
    file fails, as at full size: `decode_image` fails on exactly the JPEGs this fails on), while the inverse DCT,
    upsampling and colour conversion, arithmetic that cannot fail, run on 1/64 of the pixels: 1.5-1.8x faster."""
    img = _open_image(data, decode=False)
    info = _displayed_size(img)  # (from the header: the scaled decode below changes img.size)
    if img.format == "JPEG":
        img.draft(img.mode, (1, 1))  # the smallest scale libjpeg decodes to
    _load(img, data)
    return info


def peek_image(data: bytes) -> ImageInfo:
    """Size and encoding from the header only (no pixel decode); for trusted data (`--verify none`).

    PNG, JPEG and GIF headers are parsed here (~5 us), anything else by PIL (~30 us). EXIF orientation is honoured
    (width and height swapped for rotated photos) and images too large to decode are refused, as by `probe_image`.
    """
    if not len(data):
        raise MediaError("image bytes are empty")
    info = _header_size(data)
    if info is None:
        return _displayed_size(_open_image(data, decode=False))
    if info.width * info.height > Image.MAX_IMAGE_PIXELS:
        raise MediaError(f"image is too large to decode safely: {info.width} x {info.height} pixels, more than "
                         f"PIL's limit of {Image.MAX_IMAGE_PIXELS}")
    return info


def _displayed_size(img: Image.Image) -> ImageInfo:
    """The size `decode_image` returns: EXIF orientation 5..8 turns the image by 90 degrees. (PIL turns TIFFs
    itself: their size is the displayed one from the header on, and loading drops the orientation tag.)"""
    turned = img.format != "TIFF" and _orientation(img) >= 5
    width, height = (img.height, img.width) if turned else (img.width, img.height)
    return ImageInfo(width=width, height=height, format=(img.format or "unknown").lower())


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)
_XMP_APP1 = b"http://ns.adobe.com/xap/1.0/\0"  # XMP can carry an orientation too (tiff:Orientation)
# PNG text chunks whose keyword says they hold EXIF or XMP, which PIL reads an orientation from
_PNG_METADATA_TEXT = (b"XML:com.adobe.xmp\0", b"Raw profile type exif\0")


def _header_size(data) -> ImageInfo | None:
    """Width and height as displayed, read straight from a JPEG's or PNG's header; None (ask PIL) for other formats
    and wherever the header leaves room for doubt (XMP, two EXIF blocks, an orientation tag of an odd type)."""
    view = _unsigned(data)
    if bytes(view[:2]) == b"\xff\xd8":
        found = _jpeg_size(view)
    elif bytes(view[:8]) == b"\x89PNG\r\n\x1a\n":
        found = _png_size(view)
    else:
        return None
    if found is None:
        return None
    width, height, orientation, fmt = found
    if orientation is None or not width or not height:
        return None
    if orientation >= 5:  # EXIF orientation 5..8: the displayed image is the stored one turned by 90 degrees
        width, height = height, width
    return ImageInfo(width, height, fmt)


def _jpeg_size(view: memoryview) -> tuple[int, int, int | None, str] | None:
    """(width, height, orientation, "jpeg") from the segments before the scan data (EXIF may follow the frame
    header, so the walk goes on past it); orientation None: ask PIL."""
    pos, end = 2, len(view)
    size, exif = None, []
    while pos + 4 <= end:
        if view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA or marker == 0xD9:  # scan data (or the end): the header is over
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # segments without a length
            pos += 2
            continue
        length = view[pos + 2] << 8 | view[pos + 3]  # (big-endian; indexing, not struct: ~2x faster a segment)
        if marker in _JPEG_SOF and size is None and pos + 9 <= end:
            size = view[pos + 7] << 8 | view[pos + 8], view[pos + 5] << 8 | view[pos + 6]  # width, height
        elif marker == 0xE1:
            head = bytes(view[pos + 4:pos + 4 + len(_XMP_APP1)])
            if head.startswith(b"Exif\0\0"):
                exif.append(bytes(view[pos + 10:pos + 2 + length]))
            elif head == _XMP_APP1:
                return None
        pos += 2 + length
    if size is None or len(exif) > 1:
        return None
    return *size, (_exif_orientation(exif[0]) if exif else 1), "jpeg"


def _png_size(view: memoryview) -> tuple[int, int, int | None, str] | None:
    """(width, height, orientation, "png") from IHDR and an eXIf chunk, wherever it is (PIL reads one after the
    image data too); orientation None: ask PIL. Walks the chunk headers only."""
    if bytes(view[12:16]) != b"IHDR" or len(view) < 24:
        return None
    width, height = struct.unpack(">II", view[16:24])
    pos, orientation, seen_exif = 8, 1, False  # past the signature; each chunk: length, type, data, CRC
    while pos + 8 <= len(view):
        length, kind = struct.unpack(">I4s", view[pos:pos + 8])
        if kind == b"eXIf":
            if seen_exif:
                return None
            seen_exif, orientation = True, _exif_orientation(bytes(view[pos + 8:pos + 8 + length]))
        elif kind in (b"tEXt", b"zTXt", b"iTXt") and bytes(view[pos + 8:pos + 8 + 22]).startswith(_PNG_METADATA_TEXT):
            return None
        elif kind == b"IEND":
            break
        pos += 12 + length
    return width, height, orientation, "png"


def _exif_orientation(tiff: bytes) -> int | None:
    """The Orientation tag (0x0112) of IFD0 in an EXIF TIFF block: 1 (upright) when absent or unreadable, None when
    stored in an odd way (ask PIL)."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(order + "H", tiff[ifd:ifd + 2])
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        tag, kind, number = struct.unpack(order + "HHI", tiff[entry:entry + 8])
        if tag != 0x0112:
            continue
        if kind == 3 and number == 1:  # SHORT, stored in the first two bytes of the value field
            (value,) = struct.unpack(order + "H", tiff[entry + 8:entry + 10])
            return value if 1 <= value <= 8 else 1  # as _orientation reads it
        return None
    return 1


def encode_image(frames_or_array, format: str = "png", quality: int = 95) -> bytes:
    """uint8 [H, W, 3], [H, W], [H, W, 4] or [1, H, W, C] (tensor or array) -> PNG or JPEG bytes."""
    array = _as_uint8_array(frames_or_array)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"encode_image takes one frame, got {array.shape[0]}; pick a frame or use encode_video")
        array = array[0]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    fmt = format.lower()
    if fmt in ("jpg", "jpeg"):
        if array.ndim == 3 and array.shape[2] == 4:
            raise ValueError("JPEG has no alpha channel; pass RGB frames or use format='png'")
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()
    if fmt == "png":
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()
    raise ValueError(f"encode_image writes format 'png' or 'jpeg', got {format!r}")


def _as_uint8_array(frames) -> np.ndarray:
    array = frames.detach().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames)  # torch or numpy
    if array.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (0..255), got {array.dtype}; convert with (x * 255).round().to(torch.uint8)")
    return np.ascontiguousarray(array)


# ----------------------------------------------------------------------------------------------------------------
# videos


def _open_container(data: bytes) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    if not data:
        raise MediaError("video bytes are empty")
    try:  # metadata (titles, handler names) that is not UTF-8 must not make a playable video unreadable
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="replace")
    except av.FFmpegError as e:
        raise MediaError(f"not a readable video container ({len(data)} bytes, starts {bytes(data[:12])!r}): {e}") from None
    try:
        stream = _main_video_stream(container)
    except MediaError:
        container.close()
        raise
    if stream.codec_context is None:  # a damaged header: FFmpeg found a stream but nothing to decode it with
        container.close()
        raise MediaError(f"the video stream in the {container.format.name} container has no decodable codec")
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > Image.MAX_IMAGE_PIXELS:  # a few hundred kB of black frames can decode to gigabytes
        container.close()
        raise MediaError(f"video frames are too large to decode safely: {width} x {height} pixels, more than PIL's "
                         f"limit of {Image.MAX_IMAGE_PIXELS} (images have the same)")
    return container, stream


def _main_video_stream(container) -> av.video.stream.VideoStream:
    """The video stream a player shows, as FFmpeg picks it: the largest, not a cover picture (an audio file's
    album art is an attached_pic "video" stream of one frame)."""
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        what = "only a cover picture (attached_pic), no" if container.streams.video else "no"
        raise MediaError(f"container ({container.format.name}) has {what} video stream")
    return max(streams, key=lambda s: (s.codec_context.width * s.codec_context.height) if s.codec_context else 0)


def _frame_time(frame: av.VideoFrame, index: int, rate: float) -> float:
    """Presentation time in seconds; falls back to index / rate for streams without timestamps."""
    t = frame.time
    return float(t) if t is not None else index / rate


class PlayingClock:
    """Frame times as a player plays them: a timestamp that jumps back by half a frame or more (MPEG-TS segments
    concatenated, a wrapped clock) continues one frame after the last instead; the sampler would pass over every
    frame of the later segment, whose times it has already passed. A smaller step back (rounding) keeps the time."""

    def __init__(self, frame_interval: float):
        self.interval, self.shift, self.last = frame_interval, 0.0, None

    def time(self, stamp: float) -> float:
        t = stamp + self.shift
        if self.last is not None and t < self.last - self.interval / 2:  # a new segment
            self.shift += self.last + self.interval - t
            t = self.last + self.interval
        t = max(t, self.last or t)  # (a step back under half a frame: rounding, not a segment)
        self.last = t
        return t


def _stream_rate(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


class FrameSampler:
    """Which decoded frames a clip keeps, offered one by one with their times (seconds): decode_video's rule, also
    used to predict a clip's frame count from its metadata without decoding it (`sampled_frame_count`).

    sample_fps: keep one frame per 1 / sample_fps seconds (the first frame at or after each target time); None keeps
        every frame. A video slower than sample_fps keeps all its frames (no repeats).
    max_duration: stop at this many seconds after the first frame. max_frames: stop after this many frames kept.
    tolerance: how early (seconds) a frame may be and still count as at its target (timestamps are rounded).
    Times are measured from the first frame offered, so a stream whose timestamps start above zero works too.
    """

    def __init__(self, sample_fps: float | None = None, max_frames: int | None = None,
                 max_duration: float | None = None, tolerance: float = _TIME_EPS):
        if sample_fps is not None and not sample_fps > 0:
            raise ValueError(f"sample_fps must be > 0 or None, got {sample_fps}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
        self.sample_fps, self.max_frames, self.max_duration = sample_fps, max_frames, max_duration
        self.tolerance = tolerance
        self.kept = 0
        self._start: float | None = None
        self._next_target = 0.0  # seconds after the first frame of the next frame to keep

    def offer(self, t: float) -> bool | None:
        """True: keep the frame at `t`; False: skip it; None: stop (neither it nor any later frame is kept)."""
        self._start = t if self._start is None else self._start
        elapsed = t - self._start
        if self.max_duration is not None and elapsed >= self.max_duration and self.kept:
            return None
        if self.sample_fps is not None and elapsed < self._next_target - self.tolerance:
            return False
        self.kept += 1
        if self.sample_fps is not None:
            # the first target strictly after this frame (sources slower than sample_fps skip targets)
            self._next_target = (math.floor((elapsed + self.tolerance) * self.sample_fps) + 1) / self.sample_fps
        return True

    @property
    def full(self) -> bool:
        """max_frames are kept: decoding can stop."""
        return self.max_frames is not None and self.kept >= self.max_frames


_MILLISECOND = 1e-3


def _on_time_tolerance(fps: float) -> float:
    """How early a frame of an `fps` stream may be and still be at its sampling target: a quarter of a frame interval.
    Timestamps are rounded to the container's resolution: Matroska / WebM store milliseconds, so a 24 fps frame due
    at 83.33 ms says 83 (passed over, the clip sampled 0, 3, 4, 6, 9, 10 ... instead of 0, 2, 4, 6, 8, 10)."""
    return max(_TIME_EPS, 0.25 / fps) if fps > 0 else _TIME_EPS


def sampled_frame_count(num_frames: int, fps: float, sample_fps: float | None = None, max_frames: int | None = None,
                        max_duration: float | None = None) -> int:
    """The frames decode_video keeps of a constant-rate clip of `num_frames` frames at `fps`, without decoding it."""
    sampler = FrameSampler(sample_fps, max_frames, max_duration, tolerance=_on_time_tolerance(fps))
    for index in range(num_frames):
        keep = sampler.offer(index / fps)
        if keep is None or sampler.full:
            break
    return sampler.kept


def decode_video(
    data: bytes,
    sample_fps: float | None = None,
    max_frames: int | None = None,
    max_duration: float | None = None,
) -> torch.Tensor:
    """Encoded video bytes -> uint8 [T, H, W, 3] RGB, T >= 1, the frames a FrameSampler with these options keeps
    (timed by the container's timestamps). A packet the decoder refuses is passed over, as players do: one damaged
    frame costs that frame (and those that depend on it), not the rest of the clip."""
    container, stream = _open_container(data)
    if stream.codec_context.width * stream.codec_context.height >= _THREADED_PIXELS:
        stream.thread_type = "AUTO"  # frame + slice threads: ~1.25x on 256 x 256 clips (2 cores)
    rate = _stream_rate(stream) or 25.0
    # a timestamp rounded to a fine time base is up to a tick early, whatever rate the muxer declares (Matroska /
    # WebM store milliseconds; one may declare 1000 fps); a tick of a frame or more is a frame index, exact
    tolerance = max(_on_time_tolerance(rate), min(float(stream.time_base or 0), _MILLISECOND))
    sampler = FrameSampler(sample_fps, max_frames, max_duration, tolerance=tolerance)
    kept: list[np.ndarray] = []
    size: tuple[int, int] | None = None
    turns = 0  # counter-clockwise quarter turns that show the frames upright
    error, index = None, 0
    clock = PlayingClock(1 / rate)
    decoded = _decoded_frames(container, stream)
    try:
        for frame in decoded:
            if isinstance(frame, av.FFmpegError):
                error = frame
                continue
            keep = sampler.offer(clock.time(_frame_time(frame, index, rate)))
            index += 1
            if keep is None:
                break
            if not keep:
                continue  # decoded (later frames depend on it) but not converted to RGB: that is the costly part
            if size is None:
                size = _square_pixels(frame.width, frame.height, stream.sample_aspect_ratio)
                turns = _quarter_turns(frame.rotation)
            if (frame.width, frame.height) != size:  # a mid-stream resolution change: keep the first size
                frame = frame.reformat(width=size[0], height=size[1])
            kept.append(frame.to_ndarray(format="rgb24"))
            if sampler.full:
                break
    except av.FFmpegError as e:  # the demuxer's: a damaged container; keep the frames read so far (probe_video
        error = e  # rejects such files at conversion time)
    finally:
        decoded.close()  # before the container: the demuxer it holds must not outlive it
        container.close()
    if not kept:
        reason = f"could not be decoded: {error}" if error is not None else "holds no decodable frame"
        raise MediaError(f"video stream ({stream.codec_context.name}) {reason}")
    import torch

    frames = np.stack(kept)
    if turns:  # as a player shows it (a phone's portrait clip is stored landscape, with a display rotation)
        frames = np.ascontiguousarray(np.rot90(frames, k=turns, axes=(1, 2)))
    return torch.from_numpy(frames)


def _decoded_frames(container, stream) -> Iterator[av.VideoFrame | av.FFmpegError]:
    """The stream's frames in presentation order, and in their place the error of each packet the decoder refused
    (container.decode would stop at the first)."""
    for packet in container.demux(stream):  # its last packet is empty: it flushes the frames the decoder holds
        try:
            yield from packet.decode()
        except av.FFmpegError as e:
            yield e


def probe_video(data: bytes) -> VideoInfo:
    """Open the container, decode the first frame, walk every packet; report size, frame count, fps and duration.

    Walking the packets reads the whole file without decoding it, so a file cut short is caught: fewer packets than
    the container declares frames raises MediaError.
    """
    container, stream = _open_container(data)
    codec = stream.codec_context.name
    try:
        declared, rate, duration = stream.frames, _stream_rate(stream), _stream_duration(container, stream)
        end = None if stream.duration is None else (stream.start_time or 0) + stream.duration  # in stream time
        length = _declared_length(container, stream)
        pixel_ratio = stream.sample_aspect_ratio  # (read while the container is open)
        first, packets = _first_frame_and_packets(container, stream)
    except av.FFmpegError as e:
        raise MediaError(f"video is damaged ({codec}): {e}") from None
    finally:
        container.close()
    if first is None:
        raise MediaError(f"video stream ({codec}) holds no decodable frame")
    # fewer packets than declared frames: cut short, unless they reach the stream's end (an edit list, as a cut by
    # stream copy writes, drops samples before its start that nothing needs)
    if declared and packets.count < declared and not (end is not None and packets.end is not None
                                                      and packets.end >= end):
        raise MediaError(f"video is truncated: the container declares {declared} frames but only {packets.count} "
                         "are present")
    if not declared and length and packets.seconds is not None and rate:  # Matroska / WebM declare no frame count
        # but a duration (which some muxers count from 0, not from the first frame: its end time); short by more
        # than two frames and 5% of it: cut short (timestamps are rounded)
        reached = max(packets.seconds, packets.end_seconds)
        if length - reached > max(2 / rate, 0.05 * length):
            raise MediaError(f"video is truncated: its frames end at {reached:.3f} s but the container "
                             f"declares {length:.3f} s")
    num_frames = min(declared, packets.shown) if declared else packets.shown  # what decoding gives
    if not declared and packets.seconds and packets.count > 1:  # Matroska's rate is a nominal frame duration, which
        measured = packets.count / packets.seconds  # a variable-rate clip's frames do not keep: planning by it would
        if not rate or abs(measured - rate) > 0.05 * rate:  # expect the wrong number of frames
            rate = measured
    if not rate and duration:
        rate = num_frames / duration
    if not duration and rate:
        duration = num_frames / rate
    width, height = _displayed(*_square_pixels(first.width, first.height, pixel_ratio), _quarter_turns(first.rotation))
    return VideoInfo(width=width, height=height, num_frames=num_frames, fps=rate, duration=duration)


@dataclass
class _Packets:
    """What walking a video stream's packets (one per frame) found."""

    count: int = 0  # all of them
    shown: int = 0  # those not flagged discard (before an edit list's start): the frames decoding gives
    start: int | None = None  # the earliest pts, in the stream's time base (None: no timestamps)
    end: int | None = None  # the latest pts + duration, in the stream's time base
    time_base: Fraction | None = None

    @property
    def seconds(self) -> float | None:
        """The time the packets span, first frame to the end of the last."""
        if self.end is None or not self.time_base:
            return None
        return float((self.end - self.start) * self.time_base)

    @property
    def end_seconds(self) -> float:
        """The end of the last frame on the stream's clock (0: no timestamps)."""
        return float(self.end * self.time_base) if self.end is not None and self.time_base else 0.0


def _first_frame_and_packets(container, stream) -> tuple[av.VideoFrame | None, _Packets]:
    """Decode only the first frame; walk the data packets of the whole stream."""
    first, packets = None, _Packets(time_base=stream.time_base)
    for packet in container.demux(stream):
        if packet.size == 0:
            continue  # the demuxer's end-of-stream flush packet
        packets.count += 1
        packets.shown += not packet.is_discard
        if packet.pts is not None:
            packets.start = min(packets.start, packet.pts) if packets.start is not None else packet.pts
            packets.end = max(packets.end or 0, packet.pts + (packet.duration or 0))
        if first is None:
            try:
                decoded = packet.decode()
            except av.FFmpegError:  # a damaged packet: decode_video skips it too, as players do
                decoded = []
            first = decoded[0] if decoded else None
    if first is None:  # codecs with delay (B-frames) hand the first frame out on flush
        flushed = stream.codec_context.decode(None)
        first = flushed[0] if flushed else None
    return first, packets


def peek_video(data: bytes) -> VideoInfo:
    """Size, frame count, fps and duration from the container's header only (no decoding); for `--verify none`.
    The size is the displayed one for mp4 / QuickTime files (their track header's rotation); other containers give
    the stored size, which the loader corrects when it decodes a clip that turns out rotated."""
    container, stream = _open_container(data)
    try:
        rate = _stream_rate(stream)
        duration = _stream_duration(container, stream)
        num_frames = stream.frames or (round(duration * rate) if duration and rate else 0)
        if stream.frames and stream.duration is not None and rate:  # an edit list can show fewer than it holds
            num_frames = min(num_frames, round(duration * rate))
        width, height = _displayed(*_square_pixels(stream.codec_context.width, stream.codec_context.height,
                                                   stream.sample_aspect_ratio),
                                   _mp4_turns(data))
        return VideoInfo(width=width, height=height, num_frames=num_frames, fps=rate, duration=duration)
    finally:
        container.close()


def _quarter_turns(degrees: float | None) -> int:
    """Counter-clockwise quarter turns (0..3) of a display rotation (FFmpeg's: degrees counter-clockwise); 0 for
    none, or an angle that is not a multiple of 90."""
    if not degrees or abs(degrees / 90 - round(degrees / 90)) > 0.01:
        return 0
    return round(degrees / 90) % 4


def _displayed(width: int, height: int, turns: int) -> tuple[int, int]:
    return (height, width) if turns % 2 else (width, height)


def _square_pixels(width: int, height: int, ratio: Fraction | None) -> tuple[int, int]:
    """The size a player shows a frame at (before its rotation): anamorphic pixels widened or narrowed to square ones
    by the stream's sample aspect `ratio` (16:9 DVD video is stored 720 x 480 with 32:27 pixels: shown 853 x 480).
    Ratios beyond 1:4 .. 4:1 are taken for damaged headers and ignored."""
    if not ratio or ratio == 1 or not Fraction(1, 4) <= ratio <= 4:
        return width, height
    return max(1, round(width * ratio)), height


def _mp4_turns(data) -> int:
    """The display rotation of an mp4 / QuickTime file's first video track, from its track header's matrix (what
    FFmpeg turns decoded frames by), without decoding; 0 for other containers."""
    view = _unsigned(data)
    moov = _child_box(view, 0, len(view), b"moov")
    for trak in _child_boxes(view, *(moov or (0, 0)), b"trak"):
        mdia = _child_box(view, *trak, b"mdia")
        hdlr = mdia and _child_box(view, *mdia, b"hdlr")
        if not hdlr or bytes(view[hdlr[0] + 8:hdlr[0] + 12]) != b"vide":  # (version, flags, pre_defined, type)
            continue
        tkhd = _child_box(view, *trak, b"tkhd")
        if tkhd is None:
            return 0
        matrix = tkhd[0] + (52 if view[tkhd[0]] == 1 else 40)  # after the times, ids, layer and volume
        if matrix < tkhd[0] or matrix + 8 > tkhd[1]:
            return 0
        a, b = struct.unpack(">ii", view[matrix:matrix + 8])  # 16.16 fixed point: the first row (a, b, u)
        return _quarter_turns(-math.degrees(math.atan2(b, a)))  # as FFmpeg's av_display_rotation_get reads it
    return 0


def _child_boxes(view: memoryview, start: int, end: int, kind: bytes) -> Iterator[tuple[int, int]]:
    """(payload start, payload end) of the ISO-BMFF boxes of type `kind` directly inside [start, end)."""
    pos = start
    while pos + 8 <= end:
        size, box = struct.unpack(">I4s", view[pos:pos + 8])
        header = 8
        if size == 1 and pos + 16 <= end:  # a 64-bit size follows
            size, header = struct.unpack(">Q", view[pos + 8:pos + 16])[0], 16
        elif size == 0:  # to the end of the enclosing box
            size = end - pos
        if size < header:
            return
        if box == kind:
            yield pos + header, min(pos + size, end)
        pos += size


def _child_box(view: memoryview, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    return next(_child_boxes(view, start, end, kind), None)


def _declared_length(container, stream) -> float | None:
    """Seconds the video stream says it lasts, where it says so: its own duration (Matroska keeps it in a DURATION
    tag, "HH:MM:SS.nnnnnnnnn"), or the container's when the video is its only stream (else audio may outlast it)."""
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = re.fullmatch(r"(\d+):(\d\d):(\d\d(?:\.\d*)?)", str(stream.metadata.get("DURATION", "")).strip())
    if tag:
        return int(tag[1]) * 3600 + int(tag[2]) * 60 + float(tag[3])
    if container.duration is not None and len(container.streams) == 1:
        return container.duration / av.time_base
    return None


def _stream_duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:  # (Matroska / WebM: up to the end time, so a stream starting late lasts
        start = float(stream.start_time * stream.time_base) if stream.start_time and stream.time_base else 0.0
        return max(container.duration / av.time_base - max(start, 0.0), 0.0)  # from its start to there)
    return 0.0


def encode_video(frames, fps: float, codec: str = "libx264", crf: int = 18) -> bytes:
    """uint8 [T, H, W, 3] (tensor or array) -> mp4 bytes, deterministic for the same input.

    H.264 (libx264) by default, yuv420p for even sizes and yuv444p for odd ones (4:2:0 needs even sides);
    codec="mpeg4" is ~5x faster at lower quality. crf: libx264 quality, 0 lossless .. 51 worst.
    """
    array = _as_uint8_array(frames)
    if array.ndim != 4 or array.shape[3] != 3 or array.shape[0] < 1:
        raise ValueError(f"encode_video takes uint8 frames [T, H, W, 3] with T >= 1, got shape {tuple(array.shape)}")
    _, height, width, _ = array.shape
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = width, height
        odd = width % 2 or height % 2
        stream.pix_fmt = "yuv444p" if odd and codec == "libx264" else "yuv420p"
        # one thread: x264's output then depends only on the frames, not on the machine's core count; no
        # macroblock-tree rate control: with it, the same frames came out as different bytes now and then
        stream.options = ({"threads": "1", "crf": str(crf), "x264-params": "mbtree=0"} if codec == "libx264"
                          else {"threads": "1"})
        if codec != "libx264":
            stream.bit_rate = 8 * width * height * int(math.ceil(fps))  # ~8 bits per pixel: near-lossless for MPEG-4
        for rgb in array:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
