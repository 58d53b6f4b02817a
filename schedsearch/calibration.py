"""Calibration sets: a JSONL manifest of (images, prompt[, answer]) samples.

Format (one JSON object per line; blank lines and lines starting with ``#`` are skipped)::

    {"images": ["imgs/0001.png", "imgs/0002.png"], "prompt": "Which image shows ...?", "answer": "left"}
    {"image": "imgs/0003.png", "prompt": "What colour is the square?"}

Paths are relative to the manifest's folder (absolute paths work too). ``images`` may hold
several images per prompt; ``image`` is a shorthand for one. ``answer`` is optional; any other
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

    @property
    def images(self) -> list[Any]:
        """The decoded RGB images (opened on each access; the files were verified at load time)."""
        return [_open_image(p, self.source) for p in self.image_paths]


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


def load_manifest(path: str | Path, *, require_images: bool = True, verify: bool = True) -> list[Sample]:
    """Parse and check a manifest; with ``verify`` every image is decoded once so errors surface now."""
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
        if require_images and not imgs:
            raise CalibrationError(f"{where}: the prompt has no image (add \"image\" or \"images\")")
        markers = prompt.count(IMAGE_MARKER)
        if markers and markers != len(imgs):
            raise CalibrationError(f"{where}: the prompt has {markers} {IMAGE_MARKER} marker(s) but {len(imgs)} "
                                   f"image(s); use one marker per image, or none to put the images first")
        paths = tuple((base / i) if not Path(i).is_absolute() else Path(i) for i in imgs)
        if verify:
            for ip in paths:
                _open_image(ip, where)
        answer = obj.get("answer")
        extra = {k: v for k, v in obj.items() if k not in ("images", "image", "prompt", "answer")}
        samples.append(Sample(prompt=prompt, image_paths=paths, answer=None if answer is None else str(answer),
                              extra=extra, source=where))
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
        h.update(b"\0")
    return "sha256:" + h.hexdigest()[:32]
