"""Media bytes <-> frames: image modes, video frame sampling by timestamps, probes, errors that name the problem."""

import base64
import io
import struct
from fractions import Fraction
import zlib

import av
import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from lance_ds.data.example import Scene, render_video
from lance_ds.data.media import (
    MediaError,
    PlayingClock,
    describe,
    decode_image,
    decode_video,
    encode_image,
    encode_video,
    jpeg_decode_size,
    peek_image,
    peek_video,
    probe_image,
    probe_video,
    sampled_frame_count,
    sniff_extension,
)


def counter_video(num_frames: int, width: int = 32, height: int = 24) -> np.ndarray:
    """Frame i is uniformly grey level 20 * i: the decoded level tells which source frame was kept."""
    levels = (np.arange(num_frames) * 20).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


def frame_ids(frames: torch.Tensor) -> list[int]:
    return [round(float(f.float().mean()) / 20) for f in frames]


def pil_bytes(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# images


def test_png_round_trip_is_exact_and_odd_sizes_work():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 13, 3), dtype=np.uint8)
    out = decode_image(encode_image(rgb, "png"))
    assert out.dtype == torch.uint8 and out.shape == (1, 7, 13, 3)
    assert np.array_equal(out[0].numpy(), rgb)
    assert probe_image(encode_image(torch.from_numpy(rgb)[None], "png")).__dict__ == {
        "width": 13, "height": 7, "format": "png"}


def test_jpeg_round_trip_is_close():
    rgb = np.full((16, 16, 3), (200, 30, 30), dtype=np.uint8)
    data = encode_image(rgb, "jpeg")
    assert sniff_extension(data) == "jpg" and probe_image(data).format == "jpeg"
    assert np.abs(decode_image(data)[0].numpy().astype(int) - rgb).max() <= 6


@pytest.mark.parametrize("mode, fmt, expected", [
    ("L", "PNG", (90, 90, 90)),
    ("I;16", "PNG", (255, 255, 255)),
    ("LA", "PNG", (255, 255, 255)),  # fully transparent: composited on white
    ("RGBA", "PNG", (255, 255, 255)),
    ("P", "PNG", (0, 0, 0)),
    ("CMYK", "JPEG", (255, 255, 255)),  # zero ink is white
    ("CMYK", "TIFF", (255, 255, 255)),
    ("1", "BMP", (0, 0, 0)),
    ("F", "TIFF", (128, 128, 128)),  # float in [0, 1]: 0.5 is mid-grey (it was 0.5 / 255: black)
])
def test_every_image_mode_becomes_rgb(mode, fmt, expected):
    colour = {"L": 90, "I;16": 65535, "F": 0.5}.get(mode, 0)
    data = pil_bytes(Image.new(mode, (5, 3), colour), fmt)
    out = decode_image(data)
    assert out.shape == (1, 3, 5, 3) and out.dtype == torch.uint8
    assert tuple(out[0, 1, 2].tolist()) == expected


def test_rgba_alpha_is_composited():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    out = decode_image(encode_image(rgba, "png"))[0]
    assert tuple(out[0, 0].tolist()) == (255, 0, 0) and tuple(out[3, 0].tolist()) == (255, 255, 255)


def test_colour_key_transparency_goes_on_white_as_alpha_does():
    """A PNG's tRNS colour key (RGB or grayscale: logos, stickers) is transparency like an alpha channel's: white,
    not the key's stored colour (black)."""
    for mode, key in (("RGB", (0, 0, 0)), ("L", 0), ("P", 0)):
        image = Image.new(mode, (4, 4), key)
        if mode == "P":
            image.putpalette([0, 0, 0, 255, 0, 0])
        image.paste(1 if mode == "P" else (255, 0, 0) if mode == "RGB" else 128, (0, 0, 2, 4))
        buffer = io.BytesIO()
        image.save(buffer, "PNG", transparency=key)
        out = decode_image(buffer.getvalue())[0]
        assert tuple(out[0, 3].tolist()) == (255, 255, 255), mode  # keyed: white
        assert tuple(out[0, 0].tolist()) != (255, 255, 255), mode  # the rest as stored


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"definitely not an image", "not a readable image"),
    (encode_image(np.zeros((32, 32, 3), np.uint8) + 100, "jpeg")[:150], "not a readable image"),
    (encode_image(np.zeros((32, 32, 3), np.uint8) + 100, "png")[:-30], "not a readable image"),
])
def test_bad_images_raise_media_error(data, message):
    with pytest.raises(MediaError, match=message):
        decode_image(data)
    with pytest.raises(MediaError):
        probe_image(data)


# a 470-byte TIFF from a fuzzing run: PIL's decoder raises TypeError on it, not one of its usual errors
_FUZZED_TIFF = zlib.decompress(base64.b64decode(
    "eNrz9NRi4GBgYOBiYGBkYWCEsBgYoWweIGZiZGZgBtJtQMwMZIPEQZgNymYCYkFGHjC7B4hFoeIgPWJI5ohD2RlAQgbJHBDgAEOfoMvFCpM3Zz7ye1F"
    "rl1Bw0WNm8GW7XUkLmnKubj0q0/aVs45n8QzPiXEfDzCLrv1U3vu70dF6Xhb3jJYDU9iuztG8efTIuY8/DtiqTn22+eJOfsGMxCOruXiFPr9w2nD/Q2"
    "0eGzf3tmfTvz+Yc8lpr/Gp7bPDsn60Kt/ZxJF3JT2cVfZiYg+T6nZtKdtVxbGzmkRk5CQVReI+2zpt2y+4nK3BoK3qp5Rb+uTAz/2MDzdrv89YlPZjz"
    "kfZuZInX4mWK/RsL+V0lEm6K2CWkfGKy5L/pjtDlYBuVeKH19F5jmtY895K5wQU2KnWClhcrfXK//mz2D5845xNk4+5LOVj2uCW5F/JeuU3B5uI675n"
    "PU2SRV/vGEVXLz4TMfehqZCYVvTKvU27LmxbdOOwcsSsH38nOTzf9G9uW/8eqbUPA27tiBPgsT2m56W22NVDxu/hqm1xrgVmX8/b/QIAKieifw=="))


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on the damaged TIFF tags it skips
def test_any_damage_to_image_bytes_is_a_media_error():
    """Whatever PIL raises on damaged bytes (here TypeError, and whatever flipped bytes provoke in other formats)
    reaches the converter and the loader as MediaError: a rejected row, a skipped sample, never a crash."""
    with pytest.raises(MediaError, match="not a readable image"):
        decode_image(_FUZZED_TIFF)
    with pytest.raises(MediaError, match="not a readable image"):
        probe_image(_FUZZED_TIFF)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    for fmt in ("TIFF", "PNG", "JPEG", "GIF", "BMP", "WEBP"):
        good = pil_bytes(Image.fromarray(pixels), fmt)
        for _ in range(150):
            damaged = bytearray(good)
            for i in rng.integers(0, len(damaged), 3):
                damaged[i] = int(rng.integers(0, 256))
            for read in (decode_image, probe_image, peek_image):
                try:
                    read(bytes(damaged))
                except MediaError:
                    pass


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_verifying_probe_refuses_exactly_the_jpegs_the_loader_cannot_decode():
    """`--verify full` decodes JPEGs at 1/8 scale: every byte of their compressed data is still read, so damaged and
    cut JPEGs of every layout fail there exactly when the loader's full-size decode fails; and the size reported is
    the full one, not the scaled decode's."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    rgb = Image.fromarray(blocks // 2 + rng.integers(0, 40, blocks.shape, dtype=np.uint8))  # 64 x 48
    layouts = [pil_bytes(rgb, "JPEG", quality=90), pil_bytes(rgb, "JPEG", quality=90, subsampling=0),
               pil_bytes(rgb, "JPEG", progressive=True), pil_bytes(rgb.convert("L"), "JPEG"),
               pil_bytes(rgb.convert("CMYK"), "JPEG")]
    refused = 0
    for good in layouts:
        assert (probe_image(good).width, probe_image(good).height) == (64, 48)
        for trial in range(80):
            damaged = bytearray(good)
            for i in rng.integers(0, len(damaged), int(rng.integers(1, 6))):
                damaged[i] = int(rng.integers(0, 256))
            if trial % 4 == 0:
                damaged = damaged[:int(rng.integers(2, len(damaged)))]
            outcomes = []
            for read in (probe_image, decode_image):
                try:
                    read(bytes(damaged))
                    outcomes.append("read")
                except MediaError:
                    outcomes.append("refused")
            assert outcomes[0] == outcomes[1], (trial, outcomes)
            refused += outcomes[0] == "refused"
    assert 0.1 < refused / (5 * 80) < 0.9  # (damage of both kinds: the property is not met by refusing everything)


def test_a_heic_photo_is_refused_with_how_to_convert_it():
    """iPhones write HEIC; PIL reads it only through a plugin: the reason says what it is and what to do."""
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)  # an ISO-BMFF header, brand heic
    for read in (decode_image, probe_image):
        with pytest.raises(MediaError, match="a HEIC/HEIF image: convert it to JPEG, PNG or WebP"):
            read(heic)
    with pytest.raises(MediaError) as plain:
        decode_image(b"\x00\x00\x00\x18ftypisom" + bytes(64))  # an mp4 given as an image: no HEIC advice
    assert "HEIC" not in str(plain.value)


def test_running_out_of_memory_is_not_bad_input(monkeypatch):
    """A converter that runs out of memory must fail (a re-run tries the row again), not reject the row for good."""
    import lance_ds.data.media as media

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(media.Image, "open", no_memory)
    for read in (decode_image, probe_image):
        with pytest.raises(MemoryError):
            read(encode_image(np.zeros((4, 4, 3), np.uint8), "png"))


def test_encode_image_refuses_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="one frame"):
        encode_image(np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="format"):
        encode_image(np.zeros((4, 4, 3), np.uint8), "gif")


# ----------------------------------------------------------------------------------------------------------------
# videos


def test_video_round_trip_keeps_every_frame_and_probe_reads_metadata():
    data = encode_video(counter_video(10), fps=10)
    assert sniff_extension(data) == "mp4"
    frames = decode_video(data)
    assert frames.shape == (10, 24, 32, 3) and frames.dtype == torch.uint8
    assert frame_ids(frames) == list(range(10))
    for info in (probe_video(data), peek_video(data)):
        assert (info.width, info.height, info.num_frames) == (32, 24, 10)
        assert info.fps == pytest.approx(10) and info.duration == pytest.approx(1.0)


def test_encode_video_is_deterministic():
    frames = counter_video(5)
    assert encode_video(frames, fps=12) == encode_video(torch.from_numpy(frames), fps=12)
    # a moving shape, many times: x264's macroblock-tree rate control once gave other bytes every few calls
    moving = render_video(Scene("red", "circle", 10, 30, 30, "left", 24), size=64, frames=9)
    assert len({encode_video(moving, fps=12) for _ in range(100)}) == 1


@pytest.mark.parametrize("source_fps, sample_fps, expected", [
    (24, 12, [0, 2, 4, 6, 8, 10]),  # every second frame
    (24, 8, [0, 3, 6, 9]),
    (10, 4, [0, 3, 5, 8, 10]),  # targets 0, .25, .5, .75, 1.0 s -> first frame at or after each
    (10, 30, list(range(12))),  # slower source: all frames, none repeated
])
def test_frame_sampling_follows_timestamps(source_fps, sample_fps, expected):
    data = encode_video(counter_video(12), fps=source_fps)
    assert frame_ids(decode_video(data, sample_fps=sample_fps)) == expected


def test_max_frames_and_max_duration_stop_decoding():
    data = encode_video(counter_video(12), fps=10)
    assert frame_ids(decode_video(data, max_frames=3)) == [0, 1, 2]
    assert frame_ids(decode_video(data, max_duration=0.5)) == [0, 1, 2, 3, 4]  # frames at 0.0 .. 0.4 s
    assert frame_ids(decode_video(data, sample_fps=5, max_duration=0.7, max_frames=9)) == [0, 2, 4, 6]
    assert frame_ids(decode_video(data, sample_fps=5, max_frames=2)) == [0, 2]


@pytest.mark.parametrize("source_fps, num_frames", [(24, 30), (10, 12), (30000 / 1001, 40), (12, 1)])
def test_frame_count_predicted_from_metadata_is_what_decoding_keeps(source_fps, num_frames):
    """The loader plans a clip from KEY.json (the converter's probe: frames, fps rounded to 6 decimals) without
    decoding it: the predicted frame count must be the count decode_video keeps, for every sampling option."""
    from fractions import Fraction

    rate = Fraction(30000, 1001) if source_fps == 30000 / 1001 else source_fps
    data = encode_video(counter_video(num_frames), fps=rate)
    info = probe_video(data)
    assert info.num_frames == num_frames
    for sample_fps in (None, 5, 8, 12, 24, 29.97):
        for max_frames in (None, 1, 3, 9):
            for max_duration in (None, 0.25, 0.5, 1.0, 1.3):
                kept = decode_video(data, sample_fps=sample_fps, max_frames=max_frames, max_duration=max_duration)
                predicted = sampled_frame_count(info.num_frames, round(info.fps, 6), sample_fps, max_frames,
                                                max_duration)
                assert predicted == kept.shape[0], (sample_fps, max_frames, max_duration)


def test_timestamps_not_starting_at_zero():
    """Sampling is measured from the first frame, whatever the stream's start time."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i, rgb in enumerate(counter_video(8)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i + 5  # starts at 0.5 s
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert frame_ids(decode_video(buf.getvalue(), sample_fps=5, max_duration=0.5)) == [0, 2, 4]


def test_one_frame_video_and_odd_size():
    data = encode_video(counter_video(1, width=33, height=17), fps=12)
    assert decode_video(data, sample_fps=12, max_frames=9).shape == (1, 17, 33, 3)
    info = probe_video(data)
    assert (info.width, info.height, info.num_frames) == (33, 17, 1)


def test_mpeg4_codec_and_sampling_arguments():
    data = encode_video(counter_video(4), fps=8, codec="mpeg4")
    assert frame_ids(decode_video(data)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="sample_fps"):
        decode_video(data, sample_fps=0)
    with pytest.raises(ValueError, match="max_frames"):
        decode_video(data, max_frames=0)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        encode_video(np.zeros((4, 4, 3), np.uint8), fps=8)


def test_bad_videos_raise_media_error():
    data = encode_video(counter_video(12), fps=10)
    image = encode_image(np.zeros((8, 8, 3), np.uint8), "png")
    audio = io.BytesIO()
    with av.open(audio, mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
    for bad, message in [(b"", "empty"), (b"\x00" * 5000, "not a readable video"), (data[: len(data) // 2], "not a readable"),
                         (audio.getvalue(), "no video stream")]:
        with pytest.raises(MediaError, match=message):
            decode_video(bad)
        with pytest.raises(MediaError, match=message):
            probe_video(bad)
    assert probe_video(image).num_frames == 1  # a still image is a 1-frame video to FFmpeg, not an error


def test_damaged_video_headers_are_read_or_refused_never_crash():
    data = encode_video(counter_video(4), fps=8, codec="mpeg4")
    assert b"VideoHandler" in data and b"minf" in data
    odd_name = data.replace(b"VideoHandler", b"V\xa0deoHandler")  # a handler name that is not UTF-8: still playable
    assert frame_ids(decode_video(odd_name)) == [0, 1, 2, 3]
    assert probe_video(odd_name).num_frames == peek_video(odd_name).num_frames == 4
    no_codec = data.replace(b"minf", b"\xdcinf", 1)  # the media information box lost: a stream without a decoder
    for read in (decode_video, probe_video, peek_video):
        with pytest.raises(MediaError, match="no decodable codec"):
            read(no_codec)


def test_probe_catches_truncated_payload_when_index_comes_first(tmp_path):
    """With the index (moov) at the front, a cut file still opens; probing must notice the missing frames."""
    frames = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)  # noise: large frames
    path = tmp_path / "faststart.mp4"  # faststart rewrites the file, so it needs a real one
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    assert data[4:8] == b"ftyp" and data.index(b"moov") < data.index(b"mdat")
    assert probe_video(data).num_frames == 12
    with av.open(io.BytesIO(data)) as container:
        last_frame = [packet.pos for packet in container.demux(video=0) if packet.size][-1]
    for cut in (len(data) * 2 // 3, last_frame):  # a third lost; only the last frame lost
        with pytest.raises(MediaError, match="truncated"):
            probe_video(data[:cut])


def mux(frames: np.ndarray, fps: int, fmt: str, codec: str = "mpeg4", pix_fmt: str = "yuv420p",
        extra=None) -> bytes:
    """Encode frames into a container of format `fmt`; extra(container, stream) may set the stream up or add
    streams before the first frame."""
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if extra is not None:
            extra(container, stream)
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def test_millisecond_timestamps_sample_evenly_whatever_rate_the_container_declares():
    """A WebM muxer may declare a nominal 1000 fps for a 24 fps clip with millisecond timestamps: a frame a
    millisecond early is still on time (the tolerance was a quarter of the declared 1 ms frame and missed it)."""
    out = io.BytesIO()
    with av.open(out, "w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=1000)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, rgb in enumerate(counter_video(12)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = round(i * 1000 / 24), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(io.BytesIO(out.getvalue())) as container:
        assert container.streams.video[0].average_rate > 100  # the declared rate is the muxer's, not the clip's
    assert frame_ids(decode_video(out.getvalue(), sample_fps=12)) == [0, 2, 4, 6, 8, 10]


def test_millisecond_timestamps_sample_evenly():
    """Matroska / WebM store milliseconds: a 24 fps frame due at 83.33 ms says 83. It is on time for its target,
    not passed over for the next one (which sampled 0, 3, 4, 6, 9, 10 ... of 0, 2, 4, 6, 8, 10)."""
    data = mux(counter_video(12), 24, "matroska")
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.video[0].time_base == Fraction(1, 1000)
    assert frame_ids(decode_video(data, sample_fps=12)) == [0, 2, 4, 6, 8, 10]
    assert frame_ids(decode_video(data, sample_fps=8)) == [0, 3, 6, 9]
    info = probe_video(data)
    assert sampled_frame_count(info.num_frames, info.fps, sample_fps=12) == 6


def test_timestamps_that_jump_back_play_on():
    """MPEG-TS parts joined with cat (a recorder's segments) restart their timestamps: every frame of the second part
    was passed over, its times already behind the sampler's."""
    video = counter_video(12)
    joined = b"".join(mux(part, 12, "mpegts", codec="mpeg2video") for part in (video[:6], video[6:]))
    assert frame_ids(decode_video(joined, sample_fps=12)) == list(range(12))
    assert frame_ids(decode_video(joined, sample_fps=6)) == [0, 2, 4, 6, 8, 10]
    assert frame_ids(decode_video(joined, sample_fps=12, max_duration=0.7)) == list(range(9))


def test_a_step_back_under_half_a_frame_is_rounding_not_a_new_part():
    clock = PlayingClock(0.1)
    times = [clock.time(t) for t in (0.0, 0.1, 0.099, 0.2, 0.0, 0.1)]  # rounding at 0.099; a new part at 0.0
    assert times == pytest.approx([0.0, 0.1, 0.1, 0.2, 0.3, 0.4])


def test_a_packet_the_decoder_refuses_costs_that_frame_only():
    """A damaged frame in the middle: the clip's other frames decode (decoding stopped there, and the clip trained as
    its first 3 frames, planned as 12)."""
    clip = mux(counter_video(12), 12, "avi", codec="mjpeg", pix_fmt="yuvj420p")
    with av.open(io.BytesIO(clip)) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]

    def damaged(indices) -> bytes:
        data = bytearray(clip)
        for position, size in (packets[i] for i in indices):
            data[position:position + size] = np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes()
        return bytes(data)

    assert frame_ids(decode_video(damaged([3]))) == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11]
    assert frame_ids(decode_video(damaged([3]), sample_fps=6)) == [0, 2, 4, 6, 8, 10]
    with pytest.raises(MediaError, match="could not be decoded"):  # nothing decodable at all: still refused
        decode_video(damaged(range(12)))
    # a damaged first frame: the probe (the converter's --verify full) accepts what decoding trains on
    assert frame_ids(decode_video(damaged([0]))) == list(range(1, 12))
    assert probe_video(damaged([0])).num_frames == 12


@pytest.mark.parametrize("fmt", ["matroska", "webm"])
def test_probe_catches_a_matroska_file_cut_short(fmt):
    """Matroska declares no frame count, but a duration: frames ending well before it are a file cut short."""
    frames = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)  # noise: large frames
    data = mux(frames, 12, fmt, codec="libvpx-vp9" if fmt == "webm" else "mpeg4")
    assert (probe_video(data).num_frames, probe_video(data).duration) == (24, pytest.approx(2.0))
    with pytest.raises(MediaError, match=r"truncated: its frames end at .* but the container declares 2\.000 s"):
        probe_video(data[:len(data) * 6 // 10])


def shifted(data: bytes, fmt: str, seconds: float) -> bytes:
    """`data`'s packets remuxed into `fmt` with every timestamp `seconds` later (a -copyts remux, a TS capture)."""
    out = io.BytesIO()
    with av.open(io.BytesIO(data)) as source, av.open(out, "w", format=fmt) as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(video=0):
            if packet.pts is None and packet.dts is None:
                continue  # the demuxer's flush packet
            shift = round(seconds / packet.time_base)
            packet.pts = packet.pts + shift if packet.pts is not None else None
            packet.dts = packet.dts + shift if packet.dts is not None else None
            packet.stream = stream
            target.mux(packet)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["matroska", "webm"])
def test_a_matroska_clip_that_starts_late_is_whole_and_planned_as_decoded(fmt):
    """Matroska's duration runs from 0 to the last frame's end: a clip whose timestamps start at 5 s was rejected as
    cut short by --verify full, and --verify none planned 7 s of frames for its 2 s."""
    frames = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    clip = shifted(mux(frames, 12, fmt, codec="libvpx-vp9" if fmt == "webm" else "mpeg4"), fmt, 5.0)
    kept = decode_video(clip, sample_fps=100, max_frames=1000, max_duration=1000).shape[0]
    for info in (probe_video(clip), peek_video(clip)):
        assert (info.num_frames, kept) == (24, 24) and info.duration == pytest.approx(2.0, abs=0.01)
    with pytest.raises(MediaError, match="truncated"):  # cut short is still cut short
        probe_video(clip[:len(clip) * 6 // 10])


def test_a_variable_rate_matroska_clip_is_probed_at_its_measured_rate():
    """Matroska's rate is a nominal frame duration: 20 frames at 30 fps then 20 at 5 fps said 30 fps for 4.5 s, and
    the loader planned a third of the frames it then decoded."""
    times = [33 * i for i in range(20)] + [660 + 200 * i for i in range(20)]  # milliseconds
    out = io.BytesIO()
    with av.open(out, "w", format="matroska") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for t, rgb in zip(times, counter_video(len(times))):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    info = probe_video(out.getvalue())
    assert info.num_frames == 40 and info.fps == pytest.approx(40 / info.duration, rel=0.05) and info.fps < 10


def test_video_frames_too_large_to_decode_are_refused_as_images_are(monkeypatch):
    """A few hundred kB of black 10240 x 10240 frames decoded to 2.7 GB (6.5 GB at peak) in the loader: refused by
    the converter (both verify modes) and by decoding (other tools' shards), as PIL refuses such images."""
    clip = encode_video(counter_video(3), fps=12)  # 32 x 24
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 24 - 1)
    for read in (probe_video, peek_video, decode_video):
        with pytest.raises(MediaError, match="video frames are too large to decode safely: 32 x 24 pixels"):
            read(clip)


def test_cover_art_is_not_a_video_and_the_largest_stream_is():
    """An audio file's album art is a one-frame attached_pic "video" stream: refused, not trained as a 1-frame clip.
    With two real video streams, the largest is the video (as FFmpeg picks it), in probe, peek and decode alike."""
    def cover(container, _):
        art = container.add_stream("mjpeg", rate=1)
        art.width, art.height, art.pix_fmt = 16, 16, "yuvj420p"
        art.disposition = av.stream.Disposition.attached_pic

    with_cover = mux(counter_video(6, 32, 24), 12, "mp4", extra=cover)
    assert decode_video(with_cover).shape == (6, 24, 32, 3)

    out = io.BytesIO()  # album art alone
    with av.open(out, "w", format="mp4") as container:
        art = container.add_stream("mjpeg", rate=1)
        art.width, art.height, art.pix_fmt = 16, 16, "yuvj420p"
        art.disposition = av.stream.Disposition.attached_pic
        for packet in art.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")):
            container.mux(packet)
        for packet in art.encode():
            container.mux(packet)
    for read in (decode_video, probe_video, peek_video):
        with pytest.raises(MediaError, match="only a cover picture"):
            read(out.getvalue())

    out = io.BytesIO()  # two video streams, the smaller first
    with av.open(out, "w", format="matroska") as container:
        streams = [container.add_stream("mpeg4", rate=12) for _ in range(2)]
        for stream, (w, h) in zip(streams, [(16, 8), (32, 24)]):
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for rgb in counter_video(4, 32, 24):
            for stream in streams:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:stream.height, :stream.width]), "rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
        for stream in streams:
            for packet in stream.encode():
                container.mux(packet)
    data = out.getvalue()
    assert decode_video(data).shape == (4, 24, 32, 3)
    for read in (probe_video, peek_video):
        assert (read(data).width, read(data).height) == (32, 24)


def _clip_with_display_rotation(degrees: int | None, fmt: str) -> bytes:
    """A 48 x 32 clip whose frames differ everywhere (noise), stored unturned, with a display rotation."""
    frames = np.random.default_rng(1).integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)

    def rotate(_, stream):
        if degrees is not None:
            stream.set_display_rotation(degrees)  # counter-clockwise, as FFmpeg reads it back

    return mux(frames, 24, fmt, extra=rotate)


@pytest.mark.parametrize("fmt", ["mp4", "matroska"])
def test_anamorphic_pixels_are_shown_square(fmt):
    """16:9 DVD video is stored 720 x 480 with 32:27 pixels: it trained squashed to 3:2. Decoded, probed and peeked
    it is 853 x 480, as players show it (here 72 x 48 -> 85 x 48)."""
    left_half_white = np.zeros((3, 48, 72, 3), np.uint8)
    left_half_white[:, :, :36] = 255

    def widen(container, stream):
        stream.codec_context.sample_aspect_ratio = Fraction(32, 27)

    data = mux(left_half_white, 12, fmt, extra=widen)
    frames = decode_video(data)
    assert tuple(frames.shape) == (3, 48, 85, 3)
    assert frames[0, 24, 40].float().mean() > 200 and frames[0, 24, 45].float().mean() < 50  # scaled, not cropped
    for info in (probe_video(data), peek_video(data)):
        assert (info.width, info.height) == (85, 48)


@pytest.mark.parametrize("fmt", ["mp4", "mov", "matroska"])
@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_a_clip_with_a_display_rotation_decodes_as_a_player_shows_it(fmt, degrees):
    """Phones store portrait clips landscape and say how to turn them; like EXIF for photos, the frames are used
    turned, and KEY.json says the turned size (peeked from the header for mp4 / QuickTime)."""
    stored = decode_video(_clip_with_display_rotation(None, fmt)).numpy()
    data = _clip_with_display_rotation(degrees, fmt)
    frames = decode_video(data).numpy()
    assert np.array_equal(frames, np.rot90(stored, k=degrees // 90, axes=(1, 2)))  # the same bits, turned
    displayed = (frames.shape[2], frames.shape[1])
    assert (probe_video(data).width, probe_video(data).height) == displayed
    if fmt != "matroska":
        assert (peek_video(data).width, peek_video(data).height) == displayed


@pytest.mark.parametrize("hidden", [2, 5])
def test_a_clip_cut_by_stream_copy_counts_the_frames_it_shows(hidden):
    """`ffmpeg -ss T -c copy` keeps the frames before the cut that later ones need, hidden by the mp4's edit list:
    the container declares them, decoding does not give them. KEY.json's count is what decoding gives (else the
    loader plans each such clip twice), and the clip is not taken for a truncated one."""
    clip = encode_video(np.random.default_rng(0).integers(0, 256, (24, 32, 48, 3), dtype=np.uint8), 24,
                        codec="mpeg4")
    cut = io.BytesIO()
    with av.open(io.BytesIO(clip)) as source, av.open(cut, "w", format="mp4") as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        shift = int(hidden / (24 * source.streams.video[0].time_base))  # the first `hidden` frames before 0
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, stream
                target.mux(packet)
    data = cut.getvalue()
    shown = decode_video(data).shape[0]
    assert shown < 24
    for info in (probe_video(data), peek_video(data)):
        assert info.num_frames == shown


def test_sniff_extension():
    assert sniff_extension(pil_bytes(Image.new("RGB", (2, 2)), "WEBP")) == "webp"
    assert sniff_extension(pil_bytes(Image.new("RGB", (2, 2)), "GIF")) == "gif"
    assert sniff_extension(pil_bytes(Image.new("RGB", (2, 2)), "TIFF")) == "tiff"
    assert sniff_extension(b"random bytes here") is None
    # containers that were named .bin in the shards (stock tools key on the extension)
    flv = mux(counter_video(3), 12, "flv", codec="flv")
    m2ts = mux(counter_video(3), 12, "mpegts", extra=lambda container, stream: container.options.update(
        {"mpegts_m2ts_mode": "1"}))
    assert sniff_extension(flv) == "flv" and sniff_extension(m2ts) == "m2ts"
    assert sniff_extension(b"\x00\x00\x00\x08wide\x00\x00\x00\x00mdat") == "mov"
    # an image in ISO media with a brand of the HEIF family (mif1: the common one) was named .mp4 in the shards
    avif = pil_bytes(Image.new("RGB", (16, 16), (255, 0, 0)), "AVIF")
    mif1 = avif[:8] + b"mif1" + avif[12:]
    assert describe(mif1, "image")["format"] == describe(mif1, "image", full=False)["format"] == "avif"


def jpeg_with_orientation(orientation: int, big_endian: bool, damaged: bool = False,
                          picture: Image.Image | None = None) -> bytes:
    """A JPEG of `picture` (6 x 4 red by default) whose EXIF block (written by hand, either byte order) carries an
    orientation tag; damaged: also a Make tag typed as a fraction instead of text (PIL cannot write that EXIF back)."""
    order = ">" if big_endian else "<"
    entries = [struct.pack(order + "HHIHH", 0x0112, 3, 1, orientation, 0)]
    if damaged:  # its value, 8 bytes, lies after the IFD
        entries.insert(0, struct.pack(order + "HHII", 0x010F, 5, 1, 8 + 2 + 12 * 2 + 4))
    tiff = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(order + "I", 8)
    tiff += struct.pack(order + "H", len(entries)) + b"".join(entries) + struct.pack(order + "I", 0)
    tiff += struct.pack(order + "II", 1, 2) if damaged else b""
    app1 = b"Exif\x00\x00" + tiff
    plain = pil_bytes(picture or Image.new("RGB", (6, 4), (200, 30, 30)), "JPEG")
    return plain[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + plain[2:]


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_agrees_between_peek_probe_and_decode(orientation, big_endian):
    data = jpeg_with_orientation(orientation, big_endian)
    expected = (4, 6) if orientation >= 5 else (6, 4)  # (width, height) as displayed
    frames = decode_image(data)
    assert (frames.shape[2], frames.shape[1]) == expected
    for info in (probe_image(data), peek_image(data)):
        assert (info.width, info.height, info.format) == (*expected, "jpeg")


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_jpeg_is_decoded_shrunk_to_at_least_the_size_asked_for(orientation):
    """decode_image(at_least=(h, w)), sizes as displayed: a JPEG shrinks by the largest of 1/8, 1/4, 1/2 that keeps
    both sides at least that large (jpeg_decode_size says which), and shows what the whole image shows; other
    formats and sizes it cannot shrink to are decoded whole."""
    yy, xx = np.mgrid[0:120, 0:200]
    stored = np.stack([xx * 255 // 200, yy * 255 // 120, np.full_like(xx, 90)], -1).astype(np.uint8)  # 200 x 120
    data = jpeg_with_orientation(orientation, False, picture=Image.fromarray(stored))
    whole = decode_image(data)[0]
    height, width = whole.shape[:2]
    assert (height, width) == ((200, 120) if orientation == 6 else (120, 200))
    for at_least, scale in [((height // 4, width // 4), 4), ((height // 4 + 1, width // 4), 2),
                            ((height // 8, width // 8 + 1), 4), ((height, 1), 1), ((height // 2 + 1, 1), 1)]:
        shrunk = decode_image(data, at_least)[0]
        expected = (-(-height // scale), -(-width // scale))
        assert tuple(shrunk.shape[:2]) == expected == jpeg_decode_size(height, width, at_least), at_least
        assert shrunk.shape[0] >= min(at_least[0], height) and shrunk.shape[1] >= min(at_least[1], width)
        smaller = F.interpolate(whole.permute(2, 0, 1)[None].float(), size=expected, mode="area")[0].permute(1, 2, 0)
        assert (shrunk.float() - smaller).abs().mean() < 3, at_least  # (of 255) the same picture, turned alike
    png = encode_image(stored, "png")
    assert decode_image(png, (15, 25)).shape == (1, 120, 200, 3)


def _exif_block(orientation: int, kind: int = 3) -> bytes:
    """A little-endian EXIF TIFF block with one orientation tag, stored as SHORT (3) or LONG (4)."""
    value = struct.pack("<HH", orientation, 0) if kind == 3 else struct.pack("<I", orientation)
    return b"II*\x00" + struct.pack("<IHHHI", 8, 1, 0x0112, kind, 1) + value + struct.pack("<I", 0)


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


_XMP_TURNED = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'


def _turned_images() -> dict[str, bytes]:
    """6 x 4 pictures whose header says "turned by 90 degrees" in ways a quick header walk can miss."""
    jpeg, png = pil_bytes(Image.new("RGB", (6, 4), (200, 30, 30)), "JPEG"), pil_bytes(Image.new("RGB", (6, 4)), "PNG")
    sof, iend = jpeg.index(b"\xff\xc0"), png.index(b"IEND") - 4
    sof_end = sof + 2 + struct.unpack(">H", jpeg[sof + 2:sof + 4])[0]
    exif6, exif1 = (_jpeg_segment(0xE1, b"Exif\0\0" + _exif_block(o)) for o in (6, 1))
    raw_profile = b"\nexif\n      30\n" + (b"Exif\0\0" + _exif_block(6)).hex().encode() + b"\n"
    return {
        "jpeg, EXIF after the frame header": jpeg[:sof_end] + exif6 + jpeg[sof_end:],
        "jpeg, orientation stored as LONG": jpeg[:2] + _jpeg_segment(0xE1, b"Exif\0\0" + _exif_block(6, 4)) + jpeg[2:],
        "jpeg, two EXIF blocks (PIL reads the first)": jpeg[:2] + exif6 + exif1 + jpeg[2:],
        "jpeg, XMP orientation": jpeg[:2] + _jpeg_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0" + _XMP_TURNED)
        + jpeg[2:],
        "png, eXIf after the image data": png[:iend] + _png_chunk(b"eXIf", _exif_block(6)) + png[iend:],
        "png, XMP orientation": png[:iend] + _png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + _XMP_TURNED)
        + png[iend:],
        "png, ImageMagick's raw EXIF profile": png[:iend] + _png_chunk(
            b"zTXt", b"Raw profile type exif\0\0" + zlib.compress(raw_profile)) + png[iend:],
    }


@pytest.mark.parametrize("name", list(_turned_images()))
def test_turned_images_have_one_size_in_peek_probe_and_decode(name):
    data = _turned_images()[name]
    frames = decode_image(data)
    assert (frames.shape[2], frames.shape[1]) == (4, 6)
    for info in (probe_image(data), peek_image(data)):
        assert (info.width, info.height) == (4, 6)


def test_a_gif_frame_larger_than_its_screen_has_the_size_it_decodes_to():
    data = bytearray(pil_bytes(Image.new("RGB", (6, 4), (10, 20, 30)), "GIF"))
    data[6:10] = struct.pack("<HH", 3, 2)  # the logical screen claims 3 x 2
    frames = decode_image(bytes(data))
    for info in (probe_image(bytes(data)), peek_image(bytes(data))):
        assert (info.width, info.height) == (frames.shape[2], frames.shape[1])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decoded_images_are_turned_as_exif_transpose_turns_them(orientation):
    gradient = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 2  # every pixel different
    data = jpeg_with_orientation(orientation, big_endian=False, picture=Image.fromarray(gradient))
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(decode_image(data)[0].numpy(), expected)


def test_damaged_exif_beside_the_orientation_still_decodes_turned():
    data = jpeg_with_orientation(6, big_endian=False, damaged=True)
    with pytest.raises(AttributeError):  # PIL's own turn rewrites the EXIF block, and cannot
        ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    frames = decode_image(data)
    assert (frames.shape[2], frames.shape[1]) == (4, 6)
    for info in (probe_image(data), peek_image(data)):
        assert (info.width, info.height) == (4, 6)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_exif_orientation_of_other_formats_agrees_too(fmt):
    exif = Image.Exif()
    exif[0x0112] = 6  # turned by 90 degrees: a 30 x 10 picture shows as 10 x 30
    data = pil_bytes(Image.new("RGB", (30, 10), (10, 200, 10)), fmt, exif=exif.tobytes())
    frames = decode_image(data)
    assert (frames.shape[2], frames.shape[1]) == (10, 30)
    for info in (probe_image(data), peek_image(data)):
        assert (info.width, info.height) == (10, 30)


def _huge_bmp() -> bytes:
    data = bytearray(pil_bytes(Image.new("RGB", (4, 4)), "BMP"))
    data[18:26] = struct.pack("<ii", 200_000, 200_000)  # the header claims 4e10 pixels
    return bytes(data)


def _huge_png() -> bytes:
    data = bytearray(encode_image(np.zeros((8, 8, 3), np.uint8), "png"))
    data[16:24] = struct.pack(">II", 300_000, 300_000)  # IHDR claims 9e10 pixels (its CRC made to match)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("data, message", [
    (encode_image(np.zeros((8, 8, 3), np.uint8), "png")[:20], "not a readable image"),  # PNG cut inside IHDR
    (pil_bytes(Image.new("RGB", (4, 4)), "GIF")[:8], "not a readable image"),  # GIF cut inside its size
    (_huge_bmp(), "too large"),
    (_huge_png(), "too large"),
])
def test_damaged_headers_are_media_errors_for_peek_and_probe(data, message):
    for read in (peek_image, probe_image):
        with pytest.raises(MediaError, match=message):
            read(data)


def test_peek_reads_headers_from_arrow_buffers():
    """Arrow exports buffers as signed chars; the header parsers must read 0xFF as 255."""
    images = [encode_image(np.zeros((5, 7, 3), np.uint8), fmt) for fmt in ("png", "jpeg")]
    images.append(pil_bytes(Image.new("RGB", (7, 5)), "GIF"))
    images.append(pil_bytes(Image.new("RGB", (7, 5)), "WEBP"))  # through PIL
    column = pa.array(images, pa.binary())
    view = memoryview(column.buffers()[2])
    assert view.format == "b"
    offsets = np.frombuffer(column.buffers()[1], np.int32).tolist()
    for i, data in enumerate(images):
        piece = view[offsets[i]:offsets[i + 1]]
        assert sniff_extension(piece) == sniff_extension(data)
        info = peek_image(piece)
        assert (info.width, info.height) == (7, 5)
    with pytest.raises(MediaError, match="header"):
        peek_image(b"\x00" * 40)
