"""Video and image IO through PyAV (no torchvision, imageio or ffmpeg binary), plus layout helpers.

All frames are uint8 RGB numpy arrays [T, H, W, 3]. Files are written to a temporary
name and then ``os.replace``-d into place, so an interrupted write never leaves a
truncated file under the final name.
"""
from __future__ import annotations

import importlib.util
import io
import os
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np


def _check_video(frames, what: str = "frames") -> np.ndarray:
    """Return ``frames`` as an ndarray after checking it is uint8 [T, H, W, 3] with T >= 1."""
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"{what}: expected uint8 array [T,H,W,3] with T>=1, got dtype {arr.dtype} shape {arr.shape}")
    if arr.shape[1] < 1 or arr.shape[2] < 1:
        raise ValueError(f"{what}: expected non-empty frames, got shape {arr.shape}")
    return arr


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """Pad [T, H, W, 3] to even H and W by replicating the last row / column (yuv420p needs even sizes)."""
    _, h, w, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _makedirs_for(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


def _yuv420p_frame(rgb: np.ndarray) -> "av.VideoFrame":
    """uint8 [H, W, 3] (even H, W) -> a yuv420p frame, converted here (BT.601 limited range).

    Letting swscale convert rgb24 reads the frame's uninitialised line padding
    for small widths, so identical frames encoded to different bytes from run to
    run; planes written here have zeroed padding.
    """
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    H, W = y.shape
    sub = lambda c: c.reshape(H // 2, 2, W // 2, 2).mean(axis=(1, 3))  # noqa: E731  2x2 chroma average
    planes = [y, sub(u), sub(v)]
    frame = av.VideoFrame(W, H, "yuv420p")
    for plane, data in zip(frame.planes, planes):
        buf = np.zeros((plane.height, plane.line_size), np.uint8)
        buf[:, : data.shape[1]] = np.clip(np.rint(data), 0, 255).astype(np.uint8)
        plane.update(buf)
    return frame


def write_mp4(path: str, frames, fps: int = 10, crf: int = 18) -> None:
    """Encode uint8 [T, H, W, 3] RGB frames as H.264 (libx264, yuv420p) at ``path``.

    Odd heights/widths are padded to the next even size by replicating the last
    row/column, so ``read_mp4`` returns the *padded* size ([T, H + H % 2, W + W % 2, 3]).
    """
    frames = _pad_even(_check_video(frames))                     # [T, He, We, 3]
    _makedirs_for(path)
    tmp = path + ".tmp.mp4"
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.codec_context.thread_count = 1   # multi-threaded x264 output differs run to run
            stream.options = {"crf": str(crf)}
            for frame in frames:
                for packet in stream.encode(_yuv420p_frame(frame)):
                    container.mux(packet)
            for packet in stream.encode():                       # flush delayed (B-)frames
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):                                  # only left behind on failure
            os.remove(tmp)


def read_mp4(path: str) -> np.ndarray:
    """Decode every frame of a video file to uint8 RGB [T, H, W, 3]."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"video file not found: {path!r}")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path!r} contains no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"cannot open/decode video {path!r}: {e}") from e
    if not frames:
        raise ValueError(f"video {path!r} decoded to zero frames")
    return np.stack(frames)                                      # [T, H, W, 3]


def side_by_side(videos: Sequence, gap: int = 2) -> np.ndarray:
    """Concatenate equal-length, equal-height videos horizontally with white ``gap``-pixel columns."""
    vids = [_check_video(v, f"videos[{i}]") for i, v in enumerate(videos)]
    if not vids:
        raise ValueError("side_by_side: need at least one video")
    shapes = [v.shape for v in vids]
    if len({s[0] for s in shapes}) != 1 or len({s[1] for s in shapes}) != 1:
        raise ValueError(f"side_by_side: videos must share length T and height H, got shapes {shapes}")
    t, h = shapes[0][0], shapes[0][1]
    spacer = np.full((t, h, gap, 3), 255, dtype=np.uint8)        # white separator [T, H, gap, 3]
    parts = []
    for i, v in enumerate(vids):
        if i and gap > 0:
            parts.append(spacer)
        parts.append(v)
    return np.concatenate(parts, axis=2)                         # [T, H, sum W + gaps, 3]


def frame_strip(frames, indices: Sequence[int], gap: int = 2) -> np.ndarray:
    """One uint8 image [H, n*W + (n-1)*gap, 3] showing ``frames[indices]`` left to right."""
    frames = _check_video(frames)
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("frame_strip: indices must be non-empty")
    t = frames.shape[0]
    bad = [i for i in idx if not -t <= i < t]
    if bad:
        raise ValueError(f"frame_strip: indices {bad} out of range for {t} frames")
    return side_by_side([frames[[i]] for i in idx], gap=gap)[0]     # each [1, H, W, 3]


def _pillow_available() -> bool:
    return importlib.util.find_spec("PIL") is not None


def _encode_png_pillow(path: str, image: np.ndarray) -> None:
    from PIL import Image
    Image.fromarray(image).save(path, format="PNG")


def _encode_png_av(path: str, image: np.ndarray) -> None:
    # The image2 muxer writes a single frame to exactly this file name (no %d pattern).
    with av.open(path, mode="w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_png(path: str, image, use_pillow: bool | None = None) -> None:
    """Write a uint8 [H, W, 3] RGB image as PNG (Pillow if importable, else PyAV's png encoder)."""
    img = np.ascontiguousarray(np.asarray(image))
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"write_png: expected uint8 [H,W,3], got dtype {img.dtype} shape {img.shape}")
    if use_pillow is None:
        use_pillow = _pillow_available()
    _makedirs_for(path)
    tmp = path + ".tmp.png"
    try:
        (_encode_png_pillow if use_pillow else _encode_png_av)(tmp, img)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def encode_mp4_bytes(frames, fps: float = 10, crf: int = 18, deterministic: bool = True) -> bytes:
    """uint8 [T,H,W,3] -> H.264 mp4 bytes (in memory; odd sizes padded as in write_mp4).

    deterministic: x264's assembly kernels were seen to give different bytes for
    identical frames from run to run (in processes that had loaded torch), so by
    default they are off (``asm=0``, about 4x slower encoding) and the same clip
    always becomes the same shard bytes, locally or on S3, with any worker count.
    """
    frames = _pad_even(_check_video(frames))
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=max(1, int(round(fps))))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1   # multi-threaded x264 output differs run to run; shards must not
        stream.options = {"crf": str(crf), **({"x264-params": "asm=0"} if deterministic else {})}
        for f in frames:
            for packet in stream.encode(_yuv420p_frame(f)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def decode_mp4_bytes(data: bytes, what: str = "frames.mp4") -> np.ndarray:
    """mp4 bytes -> uint8 [T,H,W,3]; a clear ValueError naming ``what`` if undecodable or empty."""
    try:
        with av.open(io.BytesIO(data), "r") as inp:
            frames = [f.to_ndarray(format="rgb24") for f in inp.decode(video=0)]
    except (av.error.FFmpegError, ValueError, IndexError) as e:
        raise ValueError(f"{what}: cannot decode video ({e})") from None
    if not frames:
        raise ValueError(f"{what}: video has no frames")
    return np.stack(frames)
