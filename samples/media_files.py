"""Real PDF and video files for tests, good and hostile, built deterministically (no fixtures checked in)."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

A4 = (595.276, 841.89)  # points: 210 x 297 mm
A4_LANDSCAPE = (A4[1], A4[0])
SQUARE_PT = 72  # every text page has a black square this size in its top-left corner, to check orientation

# PDFs


def pdf_file(objects: list[bytes], trailer: bytes = b"") -> bytes:
    """A PDF of the given object bodies, numbered from 1 (object 1 is the catalog), with a correct xref table."""
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % offset for offset in offsets))
    out.write(b"trailer\n<< /Size %d /Root 1 0 R %s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, trailer, xref))
    return out.getvalue()


def pdf_stream(data: bytes, entries: bytes = b"") -> bytes:
    return b"<< /Length %d %s >>\nstream\n%s\nendstream" % (len(data), entries, data)


def _pages(sizes: list[tuple[float, float]], contents: list[bytes], page_entries: list[bytes] | None = None) -> bytes:
    """Catalog, page tree, Helvetica, then one page and one content stream per size."""
    count = len(sizes)
    kids = b" ".join(b"%d 0 R" % (4 + 2 * i) for i in range(count))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, count),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, ((width, height), content) in enumerate(zip(sizes, contents)):
        extra = page_entries[i] if page_entries else b""
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %.3f %.3f] /Resources << /Font << /F1 3 0 R >> >> "
            b"/Contents %d 0 R %s >>" % (width, height, 5 + 2 * i, extra)
        )
        objects.append(pdf_stream(content))
    return pdf_file(objects)


def _text_content(number: int, height: float) -> bytes:
    top = height - SQUARE_PT
    return b"0 0 0 rg 0 %.3f %d %d re f BT /F1 36 Tf 100 %.3f Td (Page %d) Tj ET" % (
        top, SQUARE_PT, SQUARE_PT, top - 60, number)  # fmt: skip


def text_pdf(sizes: list[tuple[float, float]], rotate: dict[int, int] | None = None) -> bytes:
    """A born-digital PDF: page i (1-based) says "Page i" and has a black square in its top-left corner.

    `rotate` maps page numbers to a /Rotate (degrees clockwise, as a viewer displays it)."""
    rotate = rotate or {}
    entries = [b"/Rotate %d" % rotate[i + 1] if i + 1 in rotate else b"" for i in range(len(sizes))]
    return _pages(sizes, [_text_content(i + 1, h) for i, (_, h) in enumerate(sizes)], entries)


def scanned_pdf(pages: int = 3, size: tuple[int, int] = (620, 877), dpi: int = 75) -> bytes:
    """A scanned-style PDF: each page one raster image (Pillow writes JPEG), A4-ish at `dpi`."""
    images = []
    for number in range(1, pages + 1):
        image = Image.new("RGB", size, (250, 248, 240))
        draw = ImageDraw.Draw(image)
        for line in range(12):
            draw.rectangle((40, 60 + line * 60, size[0] - 40 - 20 * (line % 3), 80 + line * 60), fill=(40, 40, 40))
        draw.text((40, 20), f"scan page {number}", fill=(0, 0, 0))
        images.append(image)
    buffer = io.BytesIO()
    images[0].save(buffer, format="PDF", save_all=True, append_images=images[1:], resolution=dpi)
    return buffer.getvalue()


def empty_pdf() -> bytes:
    """A well-formed PDF whose page tree has no pages."""
    return pdf_file([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"])


def many_pages_pdf(pages: int = 3000) -> bytes:
    """Thousands of tiny pages sharing one content stream (a few hundred KB)."""
    kids = b" ".join(b"%d 0 R" % (4 + i) for i in range(pages))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages),
        pdf_stream(b"0 0 0 rg 10 10 20 20 re f"),
    ]
    objects += [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 72 72] /Contents 3 0 R >>"] * pages
    return pdf_file(objects)


def huge_page_pdf(side_pt: float = 14400) -> bytes:
    """One page with a 14400 x 14400 pt MediaBox (the PDF maximum, 200 inches): 28800^2 px at 144 dpi."""
    return _pages([(side_pt, side_pt)], [b"0 0 0 rg 0 0 10 10 re f"])


def _deflate_repeated(block: bytes, copies: int) -> bytes:
    """zlib data for `block` repeated `copies` times, without compressing all of it: after a full flush the
    compressor starts afresh, so every copy compresses to the same bytes. The Adler-32 trailer covers the whole."""
    compressor = zlib.compressobj(9)
    head = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = zlib.compressobj(9)
    body = again.compress(block) + again.flush(zlib.Z_FULL_FLUSH)
    body = body[2:]  # without its own zlib header
    checksum = 1
    for _ in range(copies):
        checksum = zlib.adler32(block, checksum)
    tail = b"\x03\x00" + struct.pack(">I", checksum)  # an empty final block, then Adler-32
    return head + body * (copies - 1) + tail


CONTENT_BOMB_BLOCK = b"0 0 m 1 1 l S\n" * 74899  # ~1 MiB of path operators: the most expensive content to parse


def inflating_pdf(inflated_mib: int = 1024, nested: bool = False) -> bytes:
    """A page whose content stream is ~1 MB on disk and `inflated_mib` MiB inflated, of paths to draw (a PDF bomb).

    nested: the stream is Flate inside Flate, so a single layer inflates to only ~1 MB."""
    data = _deflate_repeated(CONTENT_BOMB_BLOCK, inflated_mib)
    filters = b"/FlateDecode"
    if nested:
        data, filters = zlib.compress(data, 9), b"[/FlateDecode /FlateDecode]"
    return pdf_file([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 4 0 R >>",
        pdf_stream(data, b"/Filter " + filters),
    ])  # fmt: skip


_PASSWORD_PAD = bytes.fromhex("28bf4e5e4e758a4164004e56fffa01082e2e00b6d0683e802f0ca9fe6453697a")


def _rc4(key: bytes, data: bytes) -> bytes:
    state = list(range(256))
    j = 0
    for i in range(256):
        j = (j + state[i] + key[i % len(key)]) % 256
        state[i], state[j] = state[j], state[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + state[i]) % 256
        state[i], state[j] = state[j], state[i]
        out.append(byte ^ state[(state[i] + state[j]) % 256])
    return bytes(out)


def encrypted_pdf(user_password: str = "secret", owner_password: str = "owner") -> bytes:
    """A one-page PDF encrypted with the standard security handler (RC4, 40-bit, revision 2): it opens only with
    `user_password`. Written by hand since neither Pillow nor PDFium writes encrypted files."""
    pad = lambda password: (password.encode("latin-1") + _PASSWORD_PAD)[:32]  # noqa: E731
    permissions, file_id = -4, hashlib.md5(b"dreamfleet").digest()
    owner_entry = _rc4(hashlib.md5(pad(owner_password)).digest()[:5], pad(user_password))
    key = hashlib.md5(pad(user_password) + owner_entry + struct.pack("<i", permissions) + file_id).digest()[:5]
    user_entry = _rc4(key, _PASSWORD_PAD)
    content_number = 5
    object_key = hashlib.md5(key + struct.pack("<I", content_number)[:3] + b"\x00\x00").digest()[:10]
    content = _rc4(object_key, _text_content(1, A4[1]))
    return pdf_file(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [4 0 R] /Count 1 >>",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %.3f %.3f] /Resources << /Font << /F1 3 0 R >> >> "
            b"/Contents 5 0 R >>" % A4,
            pdf_stream(content),
            b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P %d >>"
            % (owner_entry.hex().encode(), user_entry.hex().encode(), permissions),
        ],
        trailer=b"/Encrypt 6 0 R /ID [<%s> <%s>]" % (file_id.hex().encode(), file_id.hex().encode()),
    )


def garbage(size: int = 4096, seed: int = 0) -> bytes:
    """Random bytes, as a corrupt upload named .pdf or .mp4 would hold."""
    return random.Random(seed).randbytes(size)


# Videos


def video_frame(index: int, width: int, height: int) -> np.ndarray:
    """The upright picture of source frame `index`: a red top-left quarter (to check orientation) on a grey whose
    level encodes the index (10 + 8 * index, to check which frames were sampled)."""
    pixels = np.full((height, width, 3), min(255, 10 + 8 * index), np.uint8)
    pixels[: height // 2, : width // 2] = (255, 0, 0)
    return pixels


def frame_index_of(pixels: np.ndarray) -> int:
    """Inverse of video_frame's grey level, read from the bottom-right quarter."""
    height, width = pixels.shape[:2]
    return round((float(pixels[height * 3 // 4 :, width * 3 // 4 :].mean()) - 10) / 8)


def write_video(
    path: Path, *, width: int = 64, height: int = 48, fps: int = 10, seconds: float = 3.0, codec: str = "mpeg4",
    rotation: int = 0, hflip: bool = False, container_options: dict | None = None,
) -> Path:  # fmt: skip
    """An encoded video of video_frame pictures. `rotation` (counter-clockwise degrees) and `hflip` are written as
    the display matrix a phone writes: the stored frames are turned so that applying the matrix shows them upright
    (`width` x `height` is the upright size)."""
    turns = rotation // 90
    stored_width, stored_height = (height, width) if turns % 2 else (width, height)
    with av.open(str(path), "w", container_options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = stored_width, stored_height, "yuv420p"
        if rotation or hflip:
            stream.set_display_rotation(rotation, hflip=hflip)
        for index in range(round(fps * seconds)):
            upright = video_frame(index, width, height)
            # Display = rotate counter-clockwise, then mirror; so store the inverse: un-mirror, then rotate back.
            stored = np.ascontiguousarray(np.rot90(upright[:, ::-1] if hflip else upright, -turns))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        container.mux(stream.encode())
    return path


SOUND_RATE = 16000


def _sound_stream(container: av.container.OutputContainer) -> av.audio.stream.AudioStream:
    return container.add_stream("aac", rate=SOUND_RATE, layout="mono")


def _write_sound(container: av.container.OutputContainer, stream: av.audio.stream.AudioStream, seconds: float) -> None:
    samples = (np.sin(np.arange(int(SOUND_RATE * seconds)) / 10) * 0.2).astype(np.float32)
    for start in range(0, len(samples), 1024):
        frame = av.AudioFrame.from_ndarray(samples[None, start : start + 1024], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = SOUND_RATE, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def write_audio_only(path: Path, seconds: float = 1.0) -> Path:
    """A file holding only an AAC sound track (an .mp4 or .m4a)."""
    with av.open(str(path), "w") as container:
        _write_sound(container, _sound_stream(container), seconds)
    return path


def write_song_with_cover(path: Path, seconds: float = 1.0) -> Path:
    """A song (.mp4 / .m4a): a sound track and a cover picture, which FFmpeg lists as a one-frame video stream."""
    with av.open(str(path), "w", format="mp4") as container:
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 64, 48, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        sound = _sound_stream(container)
        picture = av.VideoFrame.from_ndarray(video_frame(0, 64, 48), format="rgb24").reformat(format="yuvj420p")
        container.mux(cover.encode(picture))
        container.mux(cover.encode())
        _write_sound(container, sound, seconds)
    return path


def write_video_without_frames(path: Path, seconds: float = 1.0) -> Path:
    """A Matroska file with a video track that has not a single packet, beside a sound track that has them.
    (An empty MP4 track is dropped by the muxer, and a file with no packets at all does not open.)"""
    with av.open(str(path), "w", format="matroska") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        _write_sound(container, _sound_stream(container), seconds)
    return path


def _with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF) claiming another size; the scan data is left as it is."""
    at = 2  # after SOI
    while at < len(jpeg):
        marker, length = jpeg[at + 1], struct.unpack(">H", jpeg[at + 2 : at + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):  # SOF: length, precision, height, width
            return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]
        at += 2 + length
    raise ValueError("no SOF marker")


def write_huge_header_video(path: Path, side: int = 16000, frames: int = 10) -> Path:
    """A Motion-JPEG video whose headers (the container's and every frame's) claim `side` x `side` pixels: 16000^2
    is 256 Mpx, 384 MB per decoded frame, while the file is a few KB of 64x48 pictures. FFmpeg refuses frames above
    ~268 Mpx itself, so 20000^2 would test FFmpeg rather than our guard."""
    small = av.CodecContext.create("mjpeg", "w")
    small.width, small.height, small.pix_fmt, small.time_base = 64, 48, "yuvj420p", Fraction(1, 10)
    packets = []
    for index in range(frames):
        picture = av.VideoFrame.from_ndarray(video_frame(index, 64, 48), format="rgb24").reformat(format="yuvj420p")
        picture.pts = index
        packets += small.encode(picture)
    packets += small.encode(None)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = side, side, "yuvj420p"
        for index, packet in enumerate(packets):
            claimed = av.Packet(_with_jpeg_size(bytes(packet), side, side))
            claimed.pts = claimed.dts = index
            claimed.time_base, claimed.stream = Fraction(1, 10), stream
            container.mux(claimed)
    return path
