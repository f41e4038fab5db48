"""engine/video.py on real encoded videos: Qwen3-VL's sampling, the pixel budget, upright frames, every refusal."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest

from engine.media.images import ImageError
from engine.media.video import (
    VideoError,
    decode_video,
    frame_size,
    read_video,
    sample_indices,
)
from samples import media_files
from samples.media_files import frame_index_of

LIMITS = dict(fps=2.0, max_frames=64, max_seconds=3600, max_pixels=10_000_000, max_frame_pixels=64_000_000, min_side=16)


def read(path: Path, **overrides):
    return read_video(str(path), **(LIMITS | overrides))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """3 s at 10 fps, 64x48: 30 source frames."""
    return media_files.write_video(tmp_path_factory.mktemp("video") / "clip.mp4")


def test_sample_indices_follow_qwen3_vl():
    assert sample_indices(30, 10, 2, 64) == [0, 6, 12, 17, 23, 29]  # 3 s at 2 fps
    assert sample_indices(3000, 25, 2, 8) == [0, 428, 857, 1285, 1714, 2142, 2571, 2999]  # capped, spread over all
    assert sample_indices(5, 10, 2, 64) == [0, 4]  # at least two
    assert sample_indices(1, 10, 2, 64) == [0]  # never more than there are


def test_frame_size_keeps_the_aspect_within_the_budget():
    assert frame_size(64, 48, 6, 10**7) == (64, 48)  # never enlarged
    width, height = frame_size(1920, 1080, 64, 16 * 1280 * 32 * 32)
    assert 64 * width * height <= 16 * 1280 * 32 * 32 and width / height == pytest.approx(16 / 9, rel=0.01)


@pytest.mark.parametrize(
    "name, codec", [("clip.mp4", "mpeg4"), ("clip-h264.mp4", "libx264"), ("clip.webm", "libvpx")]
)  # a WebM records no frame count: its duration gives it
def test_frames_are_sampled_at_fps_from_the_nearest_source_frames(tmp_path, name, codec):
    video = read(media_files.write_video(tmp_path / name, codec=codec))
    assert video.frames.shape == (6, 48, 64, 3) and video.frames.dtype == np.uint8
    assert video.fps == 10
    assert video.frame_indices == [0, 6, 12, 17, 23, 29]
    assert [frame_index_of(frame) for frame in video.frames] == video.frame_indices  # the frames are those frames


def test_max_frames_caps_and_spreads_evenly_over_the_whole_video(clip):
    video = read(clip, fps=10, max_frames=4)
    assert video.frame_indices == [0, 10, 19, 29]
    assert [frame_index_of(frame) for frame in video.frames] == video.frame_indices


@pytest.mark.parametrize("max_pixels", [6 * 16 * 12, 5000, 6 * 64 * 48 - 1])
def test_all_frames_together_fit_the_pixel_budget(clip, max_pixels):
    video = read(clip, max_pixels=max_pixels)
    frames, height, width = video.frames.shape[:3]
    assert frames == 6 and frames * width * height <= max_pixels
    assert width / height == pytest.approx(64 / 48, rel=0.1)
    assert width * height > 0.8 * max_pixels / frames  # scaled no further than needed


@pytest.mark.parametrize("rotation", [90, 180, 270, -90])
@pytest.mark.parametrize("mirrored", [False, True], ids=["", "mirrored"])
def test_phone_videos_come_out_upright(tmp_path, rotation, mirrored):
    path = media_files.write_video(tmp_path / "phone.mp4", rotation=rotation, hflip=mirrored)
    video = read(path)
    assert video.frames.shape == (6, 48, 64, 3)  # the upright size, not the stored one
    for frame in video.frames:  # red top-left quarter on grey, as the upright picture has it
        assert frame[5, 5].tolist() == pytest.approx([255, 0, 0], abs=12)
        assert not np.allclose(frame[5, -5], [255, 0, 0], atol=60)
        assert not np.allclose(frame[-5, 5], [255, 0, 0], atol=60)


def test_bytes_file_objects_and_any_fsspec_uri_give_the_same_video(clip):
    data = clip.read_bytes()
    with fsspec.open("memory://videos/clip.mp4", "wb") as f:
        f.write(data)
    from_memory = read_video("memory://videos/clip.mp4", **LIMITS)
    from_bytes = decode_video(data, name="clip.mp4", **LIMITS)
    with open(clip, "rb") as f:
        from_file = decode_video(f, name="clip.mp4", **LIMITS)
    for video in (from_memory, from_bytes, from_file):
        assert video.frame_indices == [0, 6, 12, 17, 23, 29] and np.array_equal(video.frames, from_memory.frames)


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(path: Path) -> Path:
    """The first 90% of a 10 s video whose index is at the front, as an interrupted download leaves it."""
    media_files.write_video(path, seconds=10, container_options={"movflags": "faststart"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 9 // 10])
    return path


@pytest.mark.parametrize(
    "build, overrides, message",
    [
        (lambda p: media_files.write_audio_only(p.with_suffix(".m4a")), {},
         r"no video stream in the file \(it has: audio\)$"),
        (lambda p: media_files.write_song_with_cover(p.with_suffix(".m4a")), {},
         r"no video stream in the file \(it has: audio, cover picture\)$"),
        (lambda p: media_files.write_video_without_frames(p.with_suffix(".mkv")), {},
         r"the video stream has no decodable frames$"),
        (lambda p: media_files.write_huge_header_video(p.with_suffix(".avi")), {},
         r"video frames are 16000x16000 = 256000000 pixels, over the limit of 64000000 \(max_image_pixels\)$"),
        (lambda p: media_files.write_video(p), {"max_seconds": 2},
         r"the video is 3.0 s long, over the limit of 2 s \(video_max_seconds\)$"),
        (lambda p: media_files.write_video(p, width=32, height=12), {},
         r"video frames are 32x12 px, smaller than 16 px on a side \(min_image_side\)$"),
        (_truncated, {}, r"the video ends at \d.\d s of the 10.0 s its header gives: it is truncated$"),
        (lambda p: _file(p, b"this is a text file, not a video\n"), {},
         r"not a video FFmpeg can open \(Invalid data found when processing input; it starts with b'this is a te'\)"),
        (lambda p: _file(p, media_files.garbage()), {}, r"not a video FFmpeg can open"),
        (lambda p: _file(p, b""), {}, r"empty file \(0 bytes\)$"),
        (lambda p: p, {}, r"no such file$"),
    ],
    ids=["audio-only", "song-with-cover", "no-frames", "huge-frames", "too-long", "too-small", "truncated",
         "text-file", "garbage", "empty", "missing"],
)  # fmt: skip
def test_bad_videos_are_refused_with_the_reason(tmp_path, build, overrides, message):
    path = build(tmp_path / "video.mp4")
    with pytest.raises(VideoError, match=f"^{path}: {message}"):
        read(path, **overrides)


def test_video_errors_are_image_errors():
    assert issubclass(VideoError, ImageError)
