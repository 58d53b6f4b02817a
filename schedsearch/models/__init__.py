"""Model loading: alias -> local directory -> ``config.json`` model_type -> family adapter.

Lifecycle::

    adapter = load_model("qwen2.5-vl")   # alias -> hub id -> HF cache (offline) -> adapter.load(dir)
    adapter = load_model("/ckpt/qwen")   # local directory -> its config.json model_type -> adapter.load(dir)

Nothing heavy is imported here: the registry holds ``"module:Class"`` strings and the adapter
module (and with it transformers) is imported only once a model_type has been read from a
``config.json``. Every expected failure raises :class:`~schedsearch.errors.ModelLoadError` with a
one-line message that names the path / id / model_type and how to fix it.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from schedsearch.errors import ModelLoadError
from schedsearch.models.base import FamilySpec, VLMAdapter, config_fingerprint

__all__ = ["ALIASES", "REFUSED", "REGISTRY", "FamilySpec", "ModelLoadError", "VLMAdapter", "adapter_class",
           "config_fingerprint", "load_model", "resolve_model_dir", "supported_model_types"]

TOY_DIR = Path(__file__).resolve().parent.parent / "toy" / "model"

#: Short names accepted wherever a model is named (CLI ``--model``, schedules). Data only.
ALIASES: dict[str, str] = {
    "qwen2.5-vl": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2-vl": "Qwen/Qwen2-VL-2B-Instruct",
    "llava-1.5": "llava-hf/llava-1.5-7b-hf",
    "llava-next": "llava-hf/llava-v1.6-mistral-7b-hf",
    "qwen3-vl": "Qwen/Qwen3-VL-4B-Instruct",
    "qwen3-vl-moe": "Qwen/Qwen3-VL-30B-A3B-Instruct",
    "gemma3": "google/gemma-3-4b-it",
    "internvl3": "OpenGVLab/InternVL3-2B-hf",
    "internvl3.5": "OpenGVLab/InternVL3_5-2B-HF",
    "llava-onevision": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    "idefics3": "HuggingFaceM4/Idefics3-8B-Llama3",
    "smolvlm": "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
    "mistral3": "mistralai/Mistral-Small-3.1-24B-Instruct-2503",
    "pixtral": "mistral-community/pixtral-12b",
    "paligemma2": "google/paligemma2-3b-mix-224",
    "glm4v": "zai-org/GLM-4.1V-9B-Thinking",
    "aya-vision": "CohereLabs/aya-vision-8b",
    "toy": str(TOY_DIR),
}

#: config.json ``model_type`` -> ``"module:Class"`` of its adapter; imported only when needed.
REGISTRY: dict[str, str] = {
    "qwen2_5_vl": "schedsearch.models.qwen_vl:Qwen25VLAdapter",
    "qwen2_vl": "schedsearch.models.qwen_vl:Qwen2VLAdapter",
    "llava": "schedsearch.models.llava:LlavaAdapter",
    "llava_next": "schedsearch.models.llava:LlavaNextAdapter",
    "qwen3_vl": "schedsearch.models.qwen3_vl:Qwen3VLAdapter",
    "qwen3_vl_moe": "schedsearch.models.qwen3_vl:Qwen3VLMoeAdapter",
    "gemma3": "schedsearch.models.gemma3:Gemma3Adapter",
    "internvl": "schedsearch.models.internvl:InternVLAdapter",
    "llava_onevision": "schedsearch.models.llava_onevision:LlavaOnevisionAdapter",
    "idefics3": "schedsearch.models.idefics3:Idefics3Adapter",
    "smolvlm": "schedsearch.models.idefics3:SmolVLMAdapter",
    "mistral3": "schedsearch.models.mistral3:Mistral3Adapter",
    "paligemma": "schedsearch.models.paligemma:PaliGemmaAdapter",
    "glm4v": "schedsearch.models.glm4v:Glm4vAdapter",
    "aya_vision": "schedsearch.models.aya_vision:AyaVisionAdapter",
}


#: config.json ``model_type`` -> why schedsearch refuses it (one line, shown as the load error). Data only.
REFUSED: dict[str, str] = {
    "qwen3_5": "Qwen3.5 mixes Gated DeltaNet linear-attention layers with attention layers; those keep a recurrent "
               "state instead of a KV cache and have no q/k projections, so the runtime's per-layer KV cache, its "
               "attention scorers and the FLOPs model do not hold for them",
    "llama4": "Llama 4's text decoder is called with inputs_embeds only (the runtime finds the visual tokens from "
              "input_ids at the decoder's parent) and its chunked-attention and no-RoPE layers are not modelled "
              "by the runtime or the FLOPs model",
}
REFUSED["qwen3_5_moe"] = REFUSED["qwen3_5"]


def supported_model_types() -> list[str]:
    return sorted(REGISTRY)


def adapter_class(model_type: str) -> type[VLMAdapter]:
    """Import and return the adapter class registered for ``model_type``."""
    target = REGISTRY.get(model_type)
    if model_type in REFUSED:
        raise ModelLoadError(f"model_type {model_type!r} is not supported: {REFUSED[model_type]}")
    if target is None:
        raise ModelLoadError(
            f"unsupported model_type {model_type!r}; supported model types: {', '.join(supported_model_types())}"
        )
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def adapter_for_model(model: Any, processor: Any = None) -> VLMAdapter:
    """Wrap an already loaded transformers model in its family adapter (no processor needed to apply a schedule)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = adapter_class(str(model_type))
    return cls(model, processor, getattr(model.config, "_name_or_path", "") or model_type)


def resolve_model_dir(name_or_path: str) -> Path:
    """Alias / hub id / path -> an existing local directory, without network access.

    A hub id that is not a local directory is looked up in the local Hugging Face cache only.
    """
    name = str(name_or_path)
    target = ALIASES.get(name, name)
    path = Path(target).expanduser()
    if path.is_dir():
        return path
    if name == "toy":
        raise ModelLoadError(f"the toy model is not shipped yet: directory {TOY_DIR} does not exist; "
                             f"pass --model DIR with a local checkpoint instead")
    is_hub_id = target.count("/") == 1 and not target.startswith((".", "/", "~")) and not path.exists()
    if is_hub_id:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(target, local_files_only=True))
        except Exception:
            raise ModelLoadError(
                f"weights for {target!r} are not available offline (not a local directory, not in the Hugging Face "
                f"cache); on a machine with network run `huggingface-cli download {target} --local-dir DIR`, "
                f"copy DIR here and pass --model DIR"
            ) from None
    if path.exists():
        raise ModelLoadError(f"model path {str(path)!r} is not a directory; pass the checkpoint directory "
                             f"(the one holding config.json)")
    raise ModelLoadError(f"model directory {str(path)!r} does not exist; check the path, or use one of the "
                         f"aliases {', '.join(sorted(ALIASES))}")


def check_weight_files(model_dir: str | Path) -> None:
    """Every ``*.safetensors`` file in ``model_dir`` is complete: its header parses and covers the file.

    Reads only the headers (format: 8-byte little-endian header length, JSON header whose tensors'
    ``data_offsets`` end at the end of the byte buffer that follows). A partial download otherwise surfaces
    as safetensors' "incomplete metadata, file not fully covered" traceback without the file's name.
    """
    import struct

    for f in sorted(Path(model_dir).glob("*.safetensors")):
        fix = (f"re-download the checkpoint (delete {f.name} and fetch it again, e.g. `huggingface-cli download "
               f"REPO --local-dir {model_dir}`)")
        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                head = fh.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if n < 2 or 8 + n > size:
                    raise ValueError(f"{size} bytes, too short for its header")
                header = json.loads(fh.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except OSError as e:
            raise ModelLoadError(f"weights file {str(f)!r} cannot be read ({e.strerror or e})") from None
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as e:
            raise ModelLoadError(f"weights file {str(f)!r} is truncated or corrupt ({e}): {fix}") from None
        if 8 + n + max(ends, default=0) != size:
            raise ModelLoadError(f"weights file {str(f)!r} is truncated or corrupt ({size} bytes, its header "
                                 f"describes {8 + n + max(ends, default=0)}): {fix}")


def read_model_type(model_dir: str | Path) -> str:
    """``model_type`` from ``model_dir/config.json`` (plain JSON, no transformers import)."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{str(cfg)!r} is missing; a checkpoint directory must hold the config.json "
                             f"written by save_pretrained")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{str(cfg)!r} is not valid JSON ({e}); re-download or re-save the checkpoint") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise ModelLoadError(f"{str(cfg)!r} has no 'model_type' string; re-save the checkpoint with save_pretrained")
    return model_type


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: Any = None,
    attn_implementation: str | None = None,
    device: str | None = None,
) -> VLMAdapter:
    """Load a VLM and its processor as a family adapter.

    ``name_or_path``: an alias from :data:`ALIASES`, a Hugging Face id already in the local cache,
    or a checkpoint directory. ``dtype`` (torch dtype or its name, default: the checkpoint's),
    ``attn_implementation`` (default: transformers' choice, SDPA) and ``device`` (default: CPU)
    are passed to ``from_pretrained``. Raises ModelLoadError for anything that cannot be loaded.
    """
    model_dir = resolve_model_dir(str(name_or_path))
    model_type = read_model_type(model_dir)
    check_weight_files(model_dir)  # a truncated download is one line naming the file, before transformers starts
    cls = adapter_class(model_type)
    adapter = cls.load(str(model_dir), dtype=dtype, attn_implementation=attn_implementation, device=device)
    adapter.name_or_path = str(name_or_path)
    return adapter


def from_pretrained_kwargs(dtype: Any, attn_implementation: str | None) -> dict[str, Any]:
    """Shared ``from_pretrained`` keyword arguments for adapters' ``load``."""
    kw: dict[str, Any] = {}
    if dtype is not None:
        if isinstance(dtype, str) and dtype != "auto":
            import torch

            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ModelLoadError(f"dtype {dtype!r} is not a torch dtype; use e.g. float32, bfloat16, float16")
            dtype = getattr(torch, dtype)
        kw["dtype"] = dtype
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    return kw


def load_hf_model(model_class: str, path: str, *, dtype: Any, attn_implementation: str | None,
                  device: str | None) -> Any:
    """``transformers.<model_class>.from_pretrained(path)`` in eval mode, on ``device``; errors as ModelLoadError."""
    import transformers

    cls = getattr(transformers, model_class)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if bars and not sys.stderr.isatty():  # a "Loading weights" bar is noise in logs, pipes and before an error
        transformers.utils.logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(path, **from_pretrained_kwargs(dtype, attn_implementation))
    except ModelLoadError:
        raise
    except Exception as e:  # OSError, ValueError, safetensors' SafetensorError (not a subclass of either)
        if not isinstance(e, (OSError, ValueError)) and type(e).__name__ != "SafetensorError":
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(f"cannot load {model_class} from {path!r}: {msg}") from e
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if device is not None:
        model = model.to(device)
    return model.eval()
