"""Serving a frozen schedule through MLflow: a pyfunc model = base model reference + schedule JSON.

    schedsearch export SCHEDULE --to mlflow --name qwen-flops0.2 [--model M]   # registers a version
    mlflow models serve -m models:/qwen-flops0.2/1 --env-manager local --host 127.0.0.1 --port 5001

Request (MLflow's scoring protocol)::

    POST /invocations
    {"dataframe_records": [{"prompt": "What is in the top-left corner?", "image": "<base64 PNG/JPEG>"}],
     "params": {"max_new_tokens": 32, "batch_size": 8}}

``image`` may be replaced by ``images``: a list of base64 images for one prompt. The response is
``{"predictions": ["generated text", ...]}``, one per record, greedy decoding with the schedule applied.
Records are generated ``batch_size`` at a time, whatever their image sizes and numbers of images (ragged
batches: each record's text is the one it gets alone).

The base model is NOT copied into the registry: the pyfunc stores its reference (an alias, a
directory or a hub id, resolved with :func:`schedsearch.models.load_model` on the serving host) and
the schedule file as an artifact. Together with :mod:`schedsearch.tracking`, this is the only module
that imports mlflow.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from schedsearch.errors import SchedsearchError


class ServingError(SchedsearchError):
    """A model that cannot be registered or a request that cannot be served."""


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError as err:  # pragma: no cover - depends on extras
        raise ServingError('MLflow is not installed: pip install "schedsearch[search]"') from err
    return mlflow


def _decode_image(data: str) -> Any:
    """base64 -> the RGB image a viewer shows, through the same decoder as calibration images (every PIL mode,
    16-bit included, converted right; bombs and extreme aspect ratios refused)."""
    import binascii

    from schedsearch.errors import ImageError
    from schedsearch.images import open_rgb

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ServingError(f"a request image is not base64 ({err})") from None
    try:
        return open_rgb(io.BytesIO(raw), "request")
    except ImageError as err:
        raise ServingError(str(err)) from None


def _check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise ServingError("every record needs a string 'prompt'")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate: no tokenizer can encode it
        bad = err.object[err.start:err.end].encode("unicode_escape").decode("ascii")
        raise ServingError(f"the prompt holds the lone surrogate {bad}, which is not text") from None
    return prompt


def encode_image(image: Any, fmt: str = "PNG") -> str:
    """PIL image -> base64 string for the request's ``image`` field."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def generate(adapter: Any, schedule: Any, records: list[dict], max_new_tokens: int = 32,
             batch_size: int = 8) -> list[str]:
    """Greedy generation with ``schedule`` applied, ``batch_size`` records per ``generate()`` call, in order.

    Records of one batch may differ in image size and number of images (a ragged batch: each record gets the
    text it gets alone); records without images are batched among themselves (a processor may not mix them).
    """
    import torch

    from schedsearch.runtime import apply_schedule

    tok = adapter.processor.tokenizer if hasattr(adapter.processor, "tokenizer") else adapter.processor
    parsed = []
    for rec in records:  # every record is checked before any generation
        imgs = rec.get("images")
        if imgs is None or (not isinstance(imgs, (list, tuple)) and not hasattr(imgs, "__len__")):
            imgs = [rec["image"]] if rec.get("image") is not None else []
        images = [_decode_image(i) if isinstance(i, str) else i for i in imgs]
        parsed.append((images, _check_prompt(rec.get("prompt"))))
    size = max(1, int(batch_size))
    out: list[str] = [""] * len(parsed)
    for with_images in (True, False):
        idx = [i for i, (images, _) in enumerate(parsed) if bool(images) == with_images]
        for k in range(0, len(idx), size):
            chunk = idx[k:k + size]
            batch = adapter.prepare([parsed[i][0] for i in chunk], [parsed[i][1] for i in chunk])
            kw = {"pad_token_id": tok.pad_token_id} if getattr(tok, "pad_token_id", None) is not None else {}
            with torch.no_grad(), apply_schedule(adapter.model, schedule, adapter=adapter):
                seq = adapter.model.generate(**batch, max_new_tokens=int(max_new_tokens), do_sample=False, **kw)
            texts = tok.batch_decode(seq[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(chunk, texts, strict=True):
                out[i] = text
    return out


def _python_model_class() -> type:
    mlflow = _mlflow()

    class ScheduledVLM(mlflow.pyfunc.PythonModel):
        """pyfunc: records of prompt + base64 image(s) -> generated text under the frozen schedule."""

        def __init__(self, model_ref: str, device: str = "auto", dtype: str = "auto"):
            self.model_ref = model_ref
            self.device = device
            self.dtype = dtype

        def load_context(self, context: Any) -> None:
            import os

            from schedsearch.devices import load_kwargs
            from schedsearch.models import load_model
            from schedsearch.schedule import check_compatible, load_schedule

            self.schedule = load_schedule(context.artifacts["schedule"])
            # the serving host decides: $SCHEDSEARCH_DEVICE / $SCHEDSEARCH_DTYPE over what was registered
            device = os.environ.get("SCHEDSEARCH_DEVICE") or getattr(self, "device", "auto")
            dtype = os.environ.get("SCHEDSEARCH_DTYPE") or getattr(self, "dtype", "auto")
            self.adapter = load_model(self.model_ref, **load_kwargs(device, dtype))
            check_compatible(self.schedule, num_layers=self.adapter.num_layers,
                             fingerprint=self.adapter.fingerprint(), family=self.adapter.family)

        def predict(self, context: Any, model_input: Any, params: dict | None = None) -> list[str]:
            records = model_input.to_dict(orient="records") if hasattr(model_input, "to_dict") else list(model_input)
            params = params or {}
            return generate(self.adapter, self.schedule, records, int(params.get("max_new_tokens", 32)),
                            int(params.get("batch_size", 8)))

    return ScheduledVLM


def register(schedule_path: str, name: str, model_ref: str, tracking_uri: str | None = None, *,
             device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """Log the pyfunc (schedule as artifact, model reference as state) and register it; returns (name, version).

    ``device``/``dtype`` (``--device``/``--dtype`` values) are where the serving host puts the model unless its
    ``$SCHEDSEARCH_DEVICE``/``$SCHEDSEARCH_DTYPE`` say otherwise. The tracking store is probed first with a
    bounded wait, so an unreachable server is one line within seconds (MLflow's own retries take minutes).
    """
    import os
    import warnings

    mlflow = _mlflow()
    from mlflow.models import infer_signature

    from schedsearch.devices import resolve_dtype
    from schedsearch.schedule import load_schedule
    from schedsearch.tracking import DEFAULT_TRACKING_URI, TrackingStoreError, check_sqlite_store, find_experiment

    sched = load_schedule(schedule_path)
    resolve_dtype(dtype)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    try:
        if uri.startswith("sqlite:///"):
            check_sqlite_store(uri)
        find_experiment(uri, "schedsearch-serving")
    except TrackingStoreError as err:
        raise ServingError(f"cannot register {name!r}: {err}; start the server or pass --tracking-uri") from None
    mlflow.set_tracking_uri(uri)
    example = [{"prompt": "what is in the image?", "image": ""}]
    import pandas as pd

    signature = infer_signature(pd.DataFrame(example), ["text"], params={"max_new_tokens": 32, "batch_size": 8})
    cls = _python_model_class()
    mlflow.set_experiment("schedsearch-serving")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mlflow.start_run(run_name=f"export-{name}") as run:
            mlflow.set_tags({"schedsearch.model_ref": model_ref, "schedsearch.family": sched.model.family,
                             "schedsearch.budget": f"{sched.budget.kind}={sched.budget.requested}"})
            info = mlflow.pyfunc.log_model(name="model", python_model=cls(model_ref, device, dtype),
                                           artifacts={"schedule": str(schedule_path)}, signature=signature,
                                           registered_model_name=name)
    version = getattr(info, "registered_model_version", None)
    if version is None:  # older MLflow: look the version up by run id
        client = mlflow.MlflowClient()
        version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'")
                      if v.run_id == run.info.run_id)
    return name, str(version)
