"""The README's "Apply a schedule" example, run as written, and the processor contract it relies on."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "calibration_data" / "toy" / "images" / "00000.png"  # "how many yellow shapes are there ?" -> 2


@pytest.fixture(scope="module")
def toy():
    from schedsearch.models import load_model

    return load_model("toy")


def _messages(image, prompt="how many yellow shapes are there ?"):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]


def test_chat_template_with_tokenize_keeps_the_image(toy):
    """apply_chat_template(tokenize=True, return_dict=True) gives the same model inputs as adapter.prepare, image
    included (the fallback processor used to return text ids only, silently dropping the image)."""
    with Image.open(IMAGE) as im:
        image = im.convert("RGB")
    got = toy.processor.apply_chat_template(_messages(image), add_generation_prompt=True, tokenize=True,
                                            return_dict=True, return_tensors="pt")
    want = toy.prepare([[image]], ["how many yellow shapes are there ?"])
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"):
        assert key in got, key
        assert torch.equal(got[key].to(want[key].device), want[key]), key
    ids = toy.processor.apply_chat_template(_messages(str(IMAGE)), add_generation_prompt=True, tokenize=True,
                                            return_tensors="pt")  # a path works too; without return_dict: ids
    assert torch.equal(ids, want["input_ids"].cpu())
    text = toy.processor.apply_chat_template(_messages(image), add_generation_prompt=True)
    assert isinstance(text, str) and "<|image_pad|>" in text  # default stays the rendered text


def _readme_block() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Apply a schedule", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_apply_example_runs_and_decodes(toy, tmp_path, monkeypatch):
    """The README's example, executed as written (only the schedule path points at a fresh file): it prints the
    decoded answer, which is what greedy generation under the schedule gives through adapter.prepare."""
    from schedsearch.runtime import apply_schedule
    from schedsearch.testing.tiny import schedule_for

    code = _readme_block()
    assert "apply_chat_template" in code and "batch_decode" in code
    path = re.search(r'load_schedule\("([^"]+)"\)', code).group(1)
    sched_file = tmp_path / "s.json"
    n = toy.num_layers
    schedule = schedule_for(toy, [1.0, 1.0] + [0.3] * (n - 2), scorer="uniform", params={})
    schedule.save(sched_file)
    code = code.replace(path, str(sched_file))
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    answer = out.getvalue().strip().splitlines()[-1]

    with Image.open(IMAGE) as im:
        batch = toy.prepare([[im.convert("RGB")]], ["how many yellow shapes are there ?"])
    with torch.no_grad(), apply_schedule(toy.model, schedule, adapter=toy):
        seq = toy.model.generate(**batch, max_new_tokens=8, do_sample=False)
    want = toy.processor.batch_decode(seq[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert answer == want.strip() and answer


def test_plain_transformers_pair_where_torchvision_works():
    """With torchvision, AutoProcessor/AutoModelForImageTextToText load the toy checkpoint and apply_schedule takes
    the bare model. Without it (CPU installs: PyPI's torchvision is a CUDA build), AutoProcessor raises ImportError
    for Qwen checkpoints, as the README says."""
    from transformers import AutoProcessor

    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or a build that does not match torch
        with pytest.raises(ImportError):
            AutoProcessor.from_pretrained(ROOT / "schedsearch" / "toy" / "model")
        return
    from transformers import AutoModelForImageTextToText

    from schedsearch.runtime import apply_schedule
    from schedsearch.testing.tiny import schedule_for

    model = AutoModelForImageTextToText.from_pretrained(ROOT / "schedsearch" / "toy" / "model")
    processor = AutoProcessor.from_pretrained(ROOT / "schedsearch" / "toy" / "model")
    inputs = processor.apply_chat_template(_messages(str(IMAGE)), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    from schedsearch.models import adapter_for_model

    schedule = schedule_for(adapter_for_model(model), [1.0] * model.config.text_config.num_hidden_layers)
    with torch.no_grad():
        ref = model(**inputs).logits
        with apply_schedule(model, schedule):
            got = model(**inputs).logits
    assert torch.equal(ref, got)
