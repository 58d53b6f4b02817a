"""Where a model runs: ``--device`` and ``--dtype`` as every command and study script takes them.

    device = resolve_device("auto")        # "cuda" when CUDA is available, else "cpu"
    device = resolve_device("cuda:1")      # DeviceError (one line) when that GPU is not there
    dtype = resolve_dtype("bfloat16")      # torch.bfloat16; "auto" -> None (the checkpoint's own dtype)
    adapter = load_model("toy", **load_kwargs("auto", "auto"))

Study scripts (argparse) add the same two options with :func:`add_arguments` and load with
``load_model(name, **load_kwargs(args.device, args.dtype))``. Nothing here loads a model; torch is
imported only when a value is resolved, so ``--help`` stays fast.
"""

from __future__ import annotations

import re
from typing import Any

from schedsearch.errors import SchedsearchError

__all__ = ["DEVICE_HELP", "DTYPES", "DTYPE_HELP", "DeviceError", "add_arguments", "load_kwargs", "resolve_device",
           "resolve_dtype"]

#: ``--dtype`` values: ``auto`` keeps the dtype the checkpoint was saved in.
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps."
DTYPE_HELP = "auto (the checkpoint's dtype), bfloat16, float16 or float32."
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


class DeviceError(SchedsearchError):
    """A device or dtype that this machine cannot provide."""


def resolve_device(name: str | None = "auto") -> str:
    """``auto``/None -> ``cuda`` when CUDA is available, else ``cpu``; checks that ``cuda[:N]``/``mps`` exist."""
    import torch

    spec = str(name or "auto").strip().lower()
    m = _DEVICE.match(spec)
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise DeviceError(f"--device {name!r} is not a device: use {DEVICE_HELP}")
    kind = m.group(1)
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise DeviceError(f"--device {spec}: CUDA is not available here (torch {torch.__version__} is {build}"
                              f"{'' if torch.version.cuda is None else ', but no GPU is visible'}); use --device cpu, "
                              "or install a CUDA build of torch (README 'Install')")
        if m.group(2) is not None and int(m.group(2)) >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        return spec
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("--device mps: Apple's MPS backend is not available here; use --device cpu")
    return spec


def resolve_dtype(name: str | None = "auto") -> Any:
    """``auto``/None -> None (``from_pretrained`` keeps the checkpoint's dtype); else the torch dtype."""
    spec = str(name or "auto").strip().lower()
    if spec not in DTYPES:
        raise DeviceError(f"--dtype {name!r} is not supported: use {DTYPE_HELP}")
    if spec == "auto":
        return None
    import torch

    return getattr(torch, spec)


def load_kwargs(device: str | None = "auto", dtype: str | None = "auto") -> dict[str, Any]:
    """``load_model`` keyword arguments for a ``--device``/``--dtype`` pair (both checked, one line on error)."""
    return {"device": resolve_device(device), "dtype": resolve_dtype(dtype)}


def add_arguments(parser: Any) -> None:
    """Add ``--device`` and ``--dtype`` (same values and defaults as the CLI) to an argparse parser."""
    parser.add_argument("--device", default="auto", help=f"where the model runs: {DEVICE_HELP}")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help=f"model weights' dtype: {DTYPE_HELP}")
