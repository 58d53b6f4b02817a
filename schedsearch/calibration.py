"""Calibration sets: a JSONL manifest of (images, prompt[, answer]) samples.

Format (one JSON object per line; blank lines and lines starting with ``#`` are skipped)::

    {"images": ["imgs/0001.png", "imgs/0002.png"], "prompt": "Which image shows ...?", "answer": "left"}
    {"image": "imgs/0003.png", "prompt": "What colour is the square?"}

Paths are relative to the manifest's folder (absolute paths work too). ``images`` may hold
several images per prompt; ``image`` is a shorthand for one. Videos (families that take them: Qwen2-VL,
Qwen2.5-VL, Qwen3-VL) come the same way, ``"video": "clips/0001"`` (a folder of frames, sorted by name) or
``"videos": ["a.mp4"]`` (decoded with PyAV), sampled to ``frames`` frames (default 8) at ``fps`` frames per
second (default: spread evenly over the clip); both settings may be given per line or to :func:`load_manifest`
(:mod:`schedsearch.video`). ``answer`` is optional; any other
keys (``qtype``, ``region``, ...) are kept in ``Sample.extra``. A manifest path may be the
``.jsonl`` file or a folder holding ``manifest.jsonl``. Full description: calibration_data/README.md.

Every problem raises :class:`~schedsearch.errors.CalibrationError` with one line naming the file
and line: missing or empty manifest, a line that is not JSON, a missing or corrupt image, a sample
without a prompt or without an image when images are required.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schedsearch.errors import CalibrationError
from schedsearch.models.base import IMAGE_MARKER

MANIFEST_NAME = "manifest.jsonl"


@dataclass(frozen=True)
class Sample:
    prompt: str
    image_paths: tuple[Path, ...]
    answer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "manifest.jsonl:12", for error messages
    video_paths: tuple[Path, ...] = ()
    video_frames: int = 8  # frame sampling: at most this many frames per clip ...
    video_fps: float | None = None  # ... at this rate (None: spread over the clip)

    @property
    def images(self) -> list[Any]:
        """The decoded RGB images (opened on each access; the files were verified at load time)."""
        return [_open_image(p, self.source) for p in self.image_paths]

    @property
    def videos(self) -> list[Any]:
        """The sampled clips (:class:`schedsearch.video.Video`, decoded on each access; verified at load time)."""
        from schedsearch.video import load_video

        return [load_video(p, frames=self.video_frames, fps=self.video_fps, where=self.source)
                for p in self.video_paths]


def _open_image(path: Path, where: str) -> Any:
    from schedsearch.images import open_rgb

    return open_rgb(path, where)  # every PIL mode as a viewer shows it, or one ImageError line


def _parse_line(line: str, where: str) -> dict:
    """One manifest line as a dict: valid JSON, an object, not absurdly nested, and valid Unicode throughout."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise CalibrationError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise CalibrationError(f"{where}: the JSON is nested too deeply to read: a sample is a flat object "
                               "(see calibration_data/README.md)") from None
    except ValueError as err:  # e.g. an integer literal longer than Python's 4300-digit conversion limit
        raise CalibrationError(f"{where}: not usable JSON ({err})") from None
    if not isinstance(obj, dict):
        raise CalibrationError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate from an escape like "\ud800": no tokenizer can encode it
        bad = err.object[err.start:err.end].encode("unicode_escape").decode("ascii")
        raise CalibrationError(f"{where}: holds the lone surrogate {bad}, which is not text (a broken \\u escape): "
                               "write the character itself or its full surrogate pair") from None
    except (RecursionError, ValueError) as err:
        raise CalibrationError(f"{where}: not usable JSON ({type(err).__name__})") from None
    return obj


def manifest_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.is_file():
        raise CalibrationError(f"calibration manifest {p} does not exist: pass a .jsonl manifest or a folder "
                               f"holding {MANIFEST_NAME} (format: calibration_data/README.md)")
    return p


def load_manifest(path: str | Path, *, require_images: bool = True, verify: bool = True,
                  video_frames: int = 8, video_fps: float | None = None) -> list[Sample]:
    """Parse and check a manifest; with ``verify`` every image and video is decoded once so errors surface now.

    ``video_frames`` / ``video_fps``: frame sampling of the videos (a line's own ``frames`` / ``fps`` win)."""
    p = manifest_path(path)
    base = p.parent
    samples: list[Sample] = []
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CalibrationError(f"{p}: cannot be read ({err})") from err
    for lineno, line in enumerate(text.split("\n"), start=1):  # JSON Lines: only \n ends a line (not U+2028...)
        line = line.removesuffix("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{p}:{lineno}"
        obj = _parse_line(line, where)
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise CalibrationError(f"{where}: missing or empty \"prompt\"")
        imgs = obj.get("images", [obj["image"]] if "image" in obj else [])
        if isinstance(imgs, str):
            imgs = [imgs]
        if not isinstance(imgs, list) or not all(isinstance(i, str) for i in imgs):
            raise CalibrationError(f"{where}: \"images\" must be a list of paths")
        vids = obj.get("videos", [obj["video"]] if "video" in obj else [])
        if isinstance(vids, str):
            vids = [vids]
        if not isinstance(vids, list) or not all(isinstance(v, str) for v in vids):
            raise CalibrationError(f"{where}: \"videos\" must be a list of paths (folders of frames or video files)")
        if require_images and not imgs and not vids:
            raise CalibrationError(f"{where}: the prompt has no image (add \"image\", \"images\" or \"video\")")
        frames = obj.get("frames", video_frames)
        fps = obj.get("fps", video_fps)
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise CalibrationError(f"{where}: \"frames\"={frames!r} must be a whole number >= 1")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 1000):
            raise CalibrationError(f"{where}: \"fps\"={fps!r} must be a number in (0, 1000] or null")
        markers = prompt.count(IMAGE_MARKER)
        if markers and markers != len(imgs):
            raise CalibrationError(f"{where}: the prompt has {markers} {IMAGE_MARKER} marker(s) but {len(imgs)} "
                                   f"image(s); use one marker per image, or none to put the images first")
        paths = tuple((base / i) if not Path(i).is_absolute() else Path(i) for i in imgs)
        vpaths = tuple((base / v) if not Path(v).is_absolute() else Path(v) for v in vids)
        if verify:
            for ip in paths:
                _open_image(ip, where)
        answer = obj.get("answer")
        extra = {k: v for k, v in obj.items()
                 if k not in ("images", "image", "videos", "video", "frames", "fps", "prompt", "answer")}
        sample = Sample(prompt=prompt, image_paths=paths, answer=None if answer is None else str(answer),
                        extra=extra, source=where, video_paths=vpaths, video_frames=frames,
                        video_fps=None if fps is None else float(fps))
        if verify and vpaths:
            sample.videos  # noqa: B018 - decodes every clip once: a bad video is reported with its line now
        samples.append(sample)
    if not samples:
        raise CalibrationError(f"{p}: the manifest has no samples")
    return samples


def calibration_hash(samples: list[Sample]) -> str:
    """sha256 over prompts, answers and image bytes, in order: identifies a calibration set's content."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps({"prompt": s.prompt, "answer": s.answer}, sort_keys=True).encode())
        for ip in s.image_paths:
            h.update(ip.read_bytes())
        for vp in s.video_paths:  # a folder of frames: every file, in name order; and the sampling settings
            h.update(json.dumps({"frames": s.video_frames, "fps": s.video_fps}).encode())
            for f in (sorted(x for x in vp.iterdir() if x.is_file()) if vp.is_dir() else [vp]):
                h.update(f.read_bytes())
        h.update(b"\0")
    return "sha256:" + h.hexdigest()[:32]
