"""Video clips for calibration and prompts: a folder of frames or a video file, sampled to a few RGB frames.

    clip = load_video("clips/0001/", frames=8)          # folder of images, sorted by file name
    clip = load_video("clips/0002.mp4", frames=8, fps=2) # a video file, decoded with PyAV (pip install av)
    clip.frames, clip.timestamps, clip.fps               # PIL RGB frames, seconds of each, sampled frame rate

Sampling (the two settings): ``fps`` (frames per second to take; None = no rate, spread ``frames`` evenly over
the clip) and ``frames`` (the most frames to keep; with ``fps``, the first ``frames`` samples at that rate). A
folder of frames is taken to be ``folder_fps`` frames per second (default 1, i.e. one frame per second).

Every bad input is one :class:`~schedsearch.errors.VideoError` line naming the file: missing path, an empty
folder or a file with zero decodable frames, a corrupt file, frames of different sizes, PyAV not installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schedsearch.errors import VideoError

__all__ = ["DEFAULT_FRAMES", "FRAME_SUFFIXES", "Video", "load_video", "sample_indices"]

DEFAULT_FRAMES = 8
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
MAX_FRAMES = 4096  # frames one clip may hold after sampling (a bound, not a default)


@dataclass(frozen=True)
class Video:
    """A sampled clip: RGB frames of one size, the time of each frame (s) and the rate they were sampled at."""

    frames: tuple[Any, ...]
    timestamps: tuple[float, ...]
    fps: float
    source: str = ""

    @property
    def size(self) -> tuple[int, int]:
        return self.frames[0].size

    def __len__(self) -> int:
        return len(self.frames)


def sample_indices(n_total: int, rate: float, *, frames: int, fps: float | None) -> list[int]:
    """Indices of the frames to keep out of ``n_total`` frames recorded at ``rate`` frames per second."""
    if n_total <= 0:
        return []
    if fps is not None and fps > 0:
        step = max(rate / fps, 1.0)
        idx, k = [], 0.0
        while round(k) < n_total and len(idx) < frames:
            if not idx or int(round(k)) != idx[-1]:
                idx.append(int(round(k)))
            k += step
        return idx
    if n_total <= frames:
        return list(range(n_total))
    return [int((i + 0.5) * n_total / frames) for i in range(frames)]  # centres of ``frames`` equal spans


def _check(frames: list[Any], where: str) -> None:
    if not frames:
        raise VideoError(f"{where}: the video has no frames")
    sizes = sorted({f.size for f in frames})
    if len(sizes) > 1:
        raise VideoError(f"{where}: frames have different sizes {sizes[:3]}: every frame of a clip must have one size")


def load_video(path: str | Path, *, frames: int = DEFAULT_FRAMES, fps: float | None = None,
               folder_fps: float = 1.0, where: str = "") -> Video:
    """Read and sample the clip at ``path`` (a folder of frame images or a video file); see the module doc."""
    p = Path(path)
    name = f"{where}: video {p}" if where else f"video {p}"
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= MAX_FRAMES:
        raise VideoError(f"{name}: frames={frames!r} must be a whole number in [1, {MAX_FRAMES}]")
    if fps is not None and not (isinstance(fps, (int, float)) and 0 < fps <= 1000):
        raise VideoError(f"{name}: fps={fps!r} must be a number in (0, 1000] or null")
    if not p.exists():
        raise VideoError(f"{name} does not exist: check the path (relative paths start at the manifest's folder)")
    if p.is_dir():
        return _load_folder(p, name, frames=frames, fps=fps, folder_fps=folder_fps)
    return _load_file(p, name, frames=frames, fps=fps)


def _load_folder(p: Path, name: str, *, frames: int, fps: float | None, folder_fps: float) -> Video:
    from schedsearch.images import open_rgb

    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise VideoError(f"{name} is a folder without frame images ({', '.join(FRAME_SUFFIXES)}): it has zero frames")
    idx = sample_indices(len(files), folder_fps, frames=frames, fps=fps)
    try:
        out = [open_rgb(files[i], name) for i in idx]
    except Exception as err:  # noqa: BLE001 - ImageError already names the frame; keep one line
        raise VideoError(f"{name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    _check(out, name)
    rate = fps if fps else folder_fps * len(idx) / len(files)
    return Video(tuple(out), tuple(i / folder_fps for i in idx), float(rate), str(p))


def _load_file(p: Path, name: str, *, frames: int, fps: float | None) -> Video:
    try:
        import av
    except ImportError:
        raise VideoError(f"{name}: decoding video files needs PyAV (pip install 'schedsearch[video]' or "
                         "pip install av); or pass a folder of frame images") from None
    if p.stat().st_size == 0:
        raise VideoError(f"{name} is an empty file: it has zero frames")
    try:
        with av.open(str(p)) as container:
            streams = container.streams.video
            if not streams:
                raise VideoError(f"{name} has no video stream")
            stream = streams[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            decoded = [(f.to_image().convert("RGB"), f.time) for f in container.decode(stream)]
    except VideoError:
        raise
    except Exception as err:  # noqa: BLE001 - av.error.* (InvalidDataError, ...): corrupt or not a video
        msg = " ".join(str(err).split()) or type(err).__name__
        raise VideoError(f"{name} cannot be decoded (corrupt or not a video file): {msg}") from None
    if not decoded:
        raise VideoError(f"{name} has zero decodable frames")
    idx = sample_indices(len(decoded), rate, frames=frames, fps=fps)
    out = [decoded[i][0] for i in idx]
    _check(out, name)
    times = tuple(float(decoded[i][1]) if decoded[i][1] is not None else i / rate for i in idx)
    sampled = fps if fps else (rate * len(idx) / len(decoded))
    return Video(tuple(out), times, float(sampled), str(p))
