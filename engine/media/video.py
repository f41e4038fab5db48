"""Videos for the VLM passes: frames sampled from a video file, and the sampling metadata Qwen3-VL's prompt needs."""

from __future__ import annotations

import io
import itertools
import math
from dataclasses import dataclass
from typing import BinaryIO

import av
import numpy as np

from engine import storage
from engine.media.images import ImageError


@dataclass
class Video:
    """Sampled frames of one video, upright RGB, all the same size."""

    frames: np.ndarray  # (frames, height, width, 3) uint8
    fps: float  # the source's frame rate: Qwen3-VL writes each frame's time (index / fps) into the prompt
    frame_indices: list[int]  # which source frames these are

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])


MIN_FRAMES = 2  # Qwen3-VL's patches span two frames in time; its processor repeats the last frame to make up a pair
READ_BUFFER_BYTES = 2**20  # FFmpeg reads a file object in pieces this size


class VideoError(ImageError):
    """A video could not be read or sampled; the message names its URI and the reason."""


def read_video(
    uri: str, *, fps: float, max_frames: int, max_seconds: float, max_pixels: int, max_frame_pixels: int, min_side: int
) -> Video:
    """Sample the video at any fsspec URI (see decode_video), streaming it from storage rather than reading it whole.

    Opening the file is retried on transient storage errors (engine.storage); reads after that are the
    filesystem's own (s3fs, gcsfs retry them), and one that still fails fails the video."""
    with _open_source(uri) as file:
        return decode_video(file, name=uri, fps=fps, max_frames=max_frames, max_seconds=max_seconds,
                            max_pixels=max_pixels, max_frame_pixels=max_frame_pixels, min_side=min_side)  # fmt: skip


def _open_source(uri: str) -> BinaryIO:
    """The video file at `uri`, open for streaming reads; VideoError naming it if it cannot be opened."""
    try:
        return _open(uri)
    except FileNotFoundError:
        raise VideoError(f"{uri}: no such file") from None
    except Exception as err:
        raise VideoError(f"{uri}: cannot read ({type(err).__name__}: {err})") from None


@storage.retried
def _open(uri: str) -> BinaryIO:
    fs, path = storage.filesystem(uri)
    return fs.open(path, "rb")


def decode_video(
    source: bytes | BinaryIO, *, name: str, fps: float, max_frames: int, max_seconds: float, max_pixels: int,
    max_frame_pixels: int, min_side: int,
) -> Video:  # fmt: skip
    """Sample frames from an encoded video (bytes, or a seekable binary file object), as Qwen3-VL samples them.

    `fps` frames per second of video, at most `max_frames` and at least 2, spread evenly over the whole duration
    (sample_indices). Frames are decoded in order and only those nearest the sampling times are kept; each is turned
    upright by the stream's display matrix (phones record sideways and say so there), converted to RGB and resized,
    keeping its aspect, so that all frames together hold at most `max_pixels` pixels.

    Checked from the headers before decoding: a video stream exists, its frame size is within `max_frame_pixels`
    and `min_side`, and its duration within `max_seconds`. A file that ends well before its header says (truncated)
    is an error, not a shorter video. Raises VideoError naming `name` and the reason."""
    file = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    head = file.read(12)
    file.seek(0)
    if not head:
        raise VideoError(f"{name}: empty file (0 bytes)")
    try:
        container = av.open(file, metadata_errors="replace", buffer_size=READ_BUFFER_BYTES)
    except av.FFmpegError as err:
        raise VideoError(f"{name}: not a video FFmpeg can open ({_reason(err)}; it starts with {head!r})") from None
    except OSError as err:  # raised by the file object FFmpeg reads through
        raise VideoError(f"{name}: cannot read ({type(err).__name__}: {err})") from None
    with container:
        stream = _video_stream(container, name)
        rate, duration = _check_header(stream, container, name, max_frame_pixels, min_side, max_seconds)
        total = stream.frames or max(1, round(duration * rate))
        indices = sample_indices(total, rate, fps, max_frames)
        # FFmpeg's own limit too, so that no frame bigger than the header said (a size change mid-stream) is decoded.
        stream.codec_context.options = {"max_pixels": str(max_frame_pixels)}
        try:
            numbers, frames = _sample(container, stream, rate, [index / rate for index in indices], max_pixels)
        except av.FFmpegError as err:
            raise VideoError(f"{name}: cannot decode video ({_reason(err)})") from None
        except OSError as err:
            raise VideoError(f"{name}: cannot read ({type(err).__name__}: {err})") from None
    if not frames:
        raise VideoError(f"{name}: the video stream has no decodable frames")
    if numbers[-1] < 0.9 * indices[-1] - rate:  # the stream stopped over 10% and a second short of its end
        raise VideoError(f"{name}: the video ends at {numbers[-1] / rate:.1f} s of the {duration:.1f} s its header "
                         "gives: it is truncated")  # fmt: skip
    return Video(frames=np.stack(frames), fps=rate, frame_indices=numbers)


def read_first_frame(uri: str, *, max_frame_pixels: int, max_packets: int = 256) -> np.ndarray:
    """A video's first frame, upright RGB at full size (for a thumbnail), with the header's frame size checked
    before anything is decoded. A stream that yields no frame in `max_packets` packets is an error."""
    file = _open_source(uri)
    try:
        with file, av.open(file, metadata_errors="replace", buffer_size=READ_BUFFER_BYTES) as container:
            stream = _video_stream(container, uri)
            _check_frame_pixels(stream, uri, max_frame_pixels)
            stream.codec_context.options = {"max_pixels": str(max_frame_pixels)}
            for packet in itertools.islice(container.demux(stream), max_packets):
                for frame in packet.decode():
                    return _converter(frame, 1, frame.width * frame.height)(frame)
    except av.FFmpegError as err:
        raise VideoError(f"{uri}: not a video FFmpeg can read ({_reason(err)})") from None
    except OSError as err:
        raise VideoError(f"{uri}: cannot read ({type(err).__name__}: {err})") from None
    raise VideoError(f"{uri}: no frame in its first {max_packets} packets")


def sample_indices(total_frames: int, source_fps: float, fps: float, max_frames: int) -> list[int]:
    """Qwen3-VL's sampling (Qwen3VLVideoProcessor.sample_frames): `fps` frames per second of video, at least 2 and
    at most `max_frames` (nor more than the video has), spread evenly from the first frame to the last."""
    count = min(max(int(total_frames / source_fps * fps), MIN_FRAMES), max_frames, total_frames)
    return np.linspace(0, total_frames - 1, count).round().astype(int).tolist()


def frame_size(width: int, height: int, frames: int, max_pixels: int) -> tuple[int, int]:
    """The largest size with the aspect of width x height (or the size itself) at which `frames` frames hold at most
    `max_pixels` pixels in all."""
    scale = min(1.0, math.sqrt(max_pixels / (frames * width * height)))
    width, height = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    while frames * width * height > max_pixels and max(width, height) > 1:  # floating point can round up a pixel
        width, height = (width - 1, height) if width >= height else (width, height - 1)
    return width, height


def _reason(err: av.FFmpegError) -> str:
    return err.strerror or str(err)


def _video_stream(container: av.container.InputContainer, name: str) -> av.video.stream.VideoStream:
    """The first video stream that is a video: a cover picture in a music file is not."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    kinds = sorted({"cover picture" if s.type == "video" else s.type for s in container.streams})
    raise VideoError(f"{name}: no video stream in the file (it has: {', '.join(kinds) or 'no streams'})")


def _check_frame_pixels(stream: av.video.stream.VideoStream, name: str, max_frame_pixels: int) -> tuple[int, int]:
    """The frame size the header gives, refused over `max_frame_pixels` before any frame is decoded."""
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > max_frame_pixels:
        raise VideoError(f"{name}: video frames are {width}x{height} = {width * height} pixels, "
                         f"over the limit of {max_frame_pixels} (max_image_pixels)")  # fmt: skip
    return width, height


def _check_header(
    stream: av.video.stream.VideoStream, container: av.container.InputContainer, name: str, max_frame_pixels: int,
    min_side: int, max_seconds: float,
) -> tuple[float, float]:  # fmt: skip
    """The frame rate and duration (seconds), after the checks that need no decoding."""
    width, height = _check_frame_pixels(stream, name, max_frame_pixels)
    if min(width, height) < min_side:
        raise VideoError(f"{name}: video frames are {width}x{height} px, smaller than {min_side} px on a side "
                         "(min_image_side)")  # fmt: skip
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise VideoError(f"{name}: the video stream has no frame rate")
    if stream.duration is not None and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    elif stream.frames:
        duration = stream.frames / rate
    else:
        raise VideoError(f"{name}: the video has no duration (its container records neither a duration nor "
                         "a frame count)")  # fmt: skip
    if duration > max_seconds:
        raise VideoError(f"{name}: the video is {duration:.1f} s long, over the limit of {max_seconds:g} s "
                         "(video_max_seconds)")  # fmt: skip
    return float(rate), duration


def _sample(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, rate: float, targets: list[float],
    max_pixels: int,
) -> tuple[list[int], list[np.ndarray]]:  # fmt: skip
    """Decode in order and keep, for each target time (seconds from the first frame), the frame nearest it; besides
    those kept, only the frame before the current one is held. Returns source frame numbers and upright RGB frames."""
    numbers: list[int] = []
    frames: list[np.ndarray] = []
    convert = None
    previous = None  # (number, time, frame) of the frame decoded before this one
    target = start = 0

    def keep(number: int, frame: av.VideoFrame) -> None:
        nonlocal convert
        if convert is None:  # the first frame kept fixes the orientation and size of all
            convert = _converter(frame, len(targets), max_pixels)
        if not numbers or numbers[-1] != number:  # a frame nearest two targets (frames sparser than planned) once
            numbers.append(number)
            frames.append(convert(frame))

    for number, frame in enumerate(container.decode(stream)):
        if number == 0:
            start = frame.time or 0.0
        time = frame.time - start if frame.time is not None else number / rate
        while target < len(targets) and time >= targets[target]:
            if previous is not None and targets[target] - previous[1] < time - targets[target]:
                keep(previous[0], previous[2])
            else:
                keep(number, frame)
            target += 1
        if target == len(targets):
            break
        previous = (number, time, frame)
    else:
        if previous is not None and target < len(targets):  # the stream ended first: its last frame is nearest
            keep(previous[0], previous[2])
    return numbers, frames


def _converter(frame: av.VideoFrame, frames: int, max_pixels: int):
    """A function from a decoded frame to an upright RGB array, sized so that `frames` of them fit in max_pixels."""
    matrix = frame.side_data.get("DISPLAYMATRIX")
    matrix = np.frombuffer(bytes(matrix), dtype=np.int32) if matrix is not None else None
    turn = round(-frame.rotation) % 360 if matrix is not None else 0  # clockwise degrees to display, as FFmpeg's
    sideways = turn in (90, 270)
    upright_width, upright_height = (frame.height, frame.width) if sideways else (frame.width, frame.height)
    width, height = frame_size(upright_width, upright_height, frames, max_pixels)
    if sideways:
        width, height = height, width

    def convert(decoded: av.VideoFrame) -> np.ndarray:
        pixels = decoded.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_ndarray()
        return np.ascontiguousarray(_upright(pixels, matrix, turn))

    return convert


def _upright(pixels: np.ndarray, matrix: np.ndarray | None, turn: int) -> np.ndarray:
    """Apply a display matrix as the ffmpeg command line does (fftools' autorotate): quarter turns and mirrors."""
    if matrix is None:
        return pixels
    if turn == 90:  # ffmpeg: transpose=clock, or cclock_flip when mirrored
        return pixels.transpose(1, 0, 2) if matrix[3] > 0 else np.rot90(pixels, -1)
    if turn == 180:
        pixels = pixels[:, ::-1] if matrix[0] < 0 else pixels
        return pixels[::-1] if matrix[4] < 0 else pixels
    if turn == 270:  # ffmpeg: transpose=cclock, or clock_flip when mirrored
        return np.rot90(pixels, -1)[::-1] if matrix[3] < 0 else np.rot90(pixels, 1)
    if turn == 0 and matrix[4] < 0:
        return pixels[::-1]
    return pixels  # an angle between quarter turns: ffmpeg rotates with a filter; phones never write one
