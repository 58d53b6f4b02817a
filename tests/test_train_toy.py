"""The training script's routing targets: which visual tokens a question is about, and the loss on attention."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies" / "toy_model"))
train_toy = pytest.importorskip("train_toy")

from schedsearch.toy.scenes import CELL, Obj, Scene  # noqa: E402


def _obj(shape, colour, row, col, size="large"):
    return Obj(shape=shape, colour=colour, size=size, row=row, col=col, cx=col * CELL + CELL / 2,
               cy=row * CELL + CELL / 2)


SCENE = Scene(objects=(_obj("circle", "red", 0, 0), _obj("square", "red", 3, 3), _obj("circle", "blue", 1, 2),
                       _obj("triangle", "green", 2, 1, "small")), background=40, noise=0)


@pytest.mark.parametrize("prompt, expected", [
    ("is there a red circle ?", [0]),
    ("is there a green square ?", []),  # answered "no": nothing to look at
    ("how many red shapes are there ?", [0, 1]),
    ("how many circles are there ?", [0, 2]),
    ("how many shapes are there ?", [0, 1, 2, 3]),
    ("what colour is the triangle ?", [3]),
    ("what shape is the blue object ?", [2]),
    ("what size is the red square ?", [1]),
    ("which quadrant is the blue circle in ?", [2]),
    ("is the red circle left of the blue circle ?", [0, 2]),
    ("is the green triangle above the red square ?", [1, 3]),
])
def test_referenced_objects(prompt, expected):
    assert train_toy.referenced_objects(SCENE, prompt) == expected


def test_token_objects_cover_each_object_where_it_is():
    tok = train_toy.token_objects(SCENE)
    side = train_toy.TOKENS_SIDE
    assert tok.shape == (side * side,)
    for i, o in enumerate(SCENE.objects):
        rows, cols = np.divmod(np.nonzero(tok == i + 1)[0], side)
        assert len(rows) >= 1
        # every token of object i lies inside its grid cell (cells are side // 4 tokens wide)
        assert set(rows // (side // 4)) == {o.row} and set(cols // (side // 4)) == {o.col}


def test_batcher_route_positions_predict_the_answer():
    from schedsearch.models.qwen_vl import QwenImageProcessor
    from schedsearch.testing.tiny import QWEN_TEMPLATE
    from schedsearch.toy.scenes import render

    tok = train_toy.build_tokenizer()
    proc = QwenImageProcessor(tok, train_toy.build_image_processor(), chat_template=QWEN_TEMPLATE)
    img = render(SCENE, np.random.default_rng(0))
    qs = [{"prompt": "what colour is the triangle ?", "answer": "green"},
          {"prompt": "is there a green square ?", "answer": "no"},
          {"prompt": "how many red shapes are there ?", "answer": "2"}]
    batch, labels, _, (pos, tgt) = train_toy.Batcher(proc)([(img, qs, SCENE), (img, qs[:1], SCENE)])
    assert pos.shape == (2, 3) and tgt.shape == (2, 3, 256)
    assert pos[0, 1] == -1 and pos[1, 1] == -1 and pos[1, 2] == -1  # "no" answer; absent turns
    for k, answer in ((0, "green"), (2, "2")):
        p = int(pos[0, k])
        # the position predicts the answer's first token (labels are shifted by one in the loss)
        assert tok.convert_ids_to_tokens(int(labels[0, p + 1])) == answer
        assert torch.isclose(tgt[0, k].sum(), torch.tensor(1.0))
    tok_obj = torch.from_numpy(train_toy.token_objects(SCENE))
    assert set(tok_obj[tgt[0, 0] > 0].tolist()) == {4}
    assert set(tok_obj[tgt[0, 2] > 0].tolist()) == {1, 2}


def test_route_loss_is_minimal_at_the_target():
    b, seq = 1, 12
    vis = torch.zeros(b, seq, dtype=torch.bool)
    vis[0, 2:6] = True
    pos = torch.tensor([[9]])
    tgt = torch.tensor([[[0.5, 0.5, 0.0, 0.0]]])

    def attn(row):
        a = torch.full((b, 2, seq, seq), 1.0 / seq)
        a[0, :, 9] = row
        return (a,)

    on_target = torch.zeros(seq)
    on_target[[2, 3]] = 0.3  # the rest of the mass on text tokens: renormalized away
    on_target[10] = 0.4
    off_target = torch.zeros(seq)
    off_target[[4, 5]] = 0.5
    lo = train_toy.route_loss(attn(on_target), vis, (pos, tgt), [0], 1)
    hi = train_toy.route_loss(attn(off_target), vis, (pos, tgt), [0], 1)
    assert lo == pytest.approx(np.log(2), abs=1e-4)
    assert hi > lo + 5
    assert train_toy.route_loss(attn(on_target), vis, (torch.tensor([[-1]]), tgt), [0], 1) == 0


def test_presence_share_sets_the_share_of_presence_questions():
    draws = [train_toy.forced_qtype(1, i, k, 0.5) for i in range(400) for k in range(3)]
    share = draws.count("presence") / len(draws)
    assert 0.45 < share < 0.55 and set(draws) == {"presence", None}
    assert draws == [train_toy.forced_qtype(1, i, k, 0.5) for i in range(400) for k in range(3)]  # deterministic
    assert all(train_toy.forced_qtype(1, i, 0, 0.0) is None for i in range(50))  # default: generator's mix
    from schedsearch.toy import sample

    item = sample(1, 5, qtype=train_toy.forced_qtype(1, 5, 0, 1.0))
    img, qs, _ = train_toy.with_turns(item, 1, 5, 3, presence_share=1.0)
    assert [q["qtype"] for q in qs] == ["presence"] * 3


def test_untied_model_and_no_decay_groups():
    tok = train_toy.build_tokenizer()
    tied = train_toy.build_model(tok, 32, 2, 16)
    untied = train_toy.build_model(tok, 32, 2, 16, tie=False)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    assert untied.lm_head.weight is not untied.get_input_embeddings().weight
    head = train_toy.AuxHeads(32, -1)
    n_all = len(list(untied.parameters())) + len(list(head.parameters()))
    (one,) = train_toy.param_groups(untied, head)
    assert one["weight_decay"] > 0 and len(one["params"]) == n_all  # the shipped recipe: decay everywhere
    decayed, plain = train_toy.param_groups(untied, head, decay_embeddings=False)
    assert plain["weight_decay"] == 0 and len(decayed["params"]) + len(plain["params"]) == n_all
    ids = {id(p) for p in plain["params"]}
    assert id(untied.lm_head.weight) in ids and id(untied.get_input_embeddings().weight) in ids
    q_proj = untied.model.language_model.layers[0].self_attn.q_proj.weight
    assert id(q_proj) not in ids


def test_single_attribute_yesno_answers_from_the_scene():
    answers = []
    for i in range(200):
        q = train_toy.single_attribute_yesno(SCENE, np.random.default_rng(i))
        word = q["prompt"].split()[3]
        present = {o.colour for o in SCENE.objects} | {o.shape for o in SCENE.objects}
        assert q["answer"] == ("yes" if word in present else "no"), q
        if "shape" in q["prompt"]:  # colour questions: SCENE lacks yellow, so "no" is possible
            answers.append(q["answer"])
        else:  # SCENE holds all three shapes: a shape question can only be answered "yes"
            assert q["answer"] == "yes"
    assert len(answers) > 60 and 0.35 < answers.count("yes") / len(answers) < 0.65  # balanced
    tok = train_toy.build_tokenizer()
    assert tok.unk_token_id not in tok("is there a red shape ?")["input_ids"]


@pytest.mark.parametrize("prompt, expected", [
    ("is there a red circle ?", ("red", "circle", None, None)),
    ("how many squares are there ?", (None, "square", None, None)),
    ("how many shapes are there ?", (None, None, None, None)),
    ("what shape is the blue object ?", ("blue", None, None, None)),
    ("is the red circle left of the green triangle ?", ("red", "circle", "green", "triangle")),
    ("is the blue circle above the red square ?", ("blue", "circle", "red", "square")),
])
def test_named_words_slots(prompt, expected):
    colours, shapes = list(train_toy.COLOURS), list(train_toy.SHAPES)
    want = [0 if w is None else (colours if k % 2 == 0 else shapes).index(w) + 1 for k, w in enumerate(expected)]
    assert train_toy.named_words(prompt).tolist() == want


def test_scene_summary_counts_and_places_each_pair():
    table = train_toy.scene_summary(SCENE)
    pairs = list(train_toy.PAIRS)
    assert table.shape == (len(pairs), len(train_toy.SUMMARY))
    sizes = list(train_toy.SIZES)
    red_circle = table[pairs.index(("red", "circle"))]
    assert red_circle.tolist() == [1, sizes.index("large") + 1, 0 + 1, 0 + 1]
    green_triangle = table[pairs.index(("green", "triangle"))]
    assert green_triangle.tolist() == [1, sizes.index("small") + 1, 2 + 1, 1 + 1]
    assert table[pairs.index(("yellow", "square"))].tolist() == [0, 0, 0, 0]
    assert table[:, 0].sum() == len(SCENE.objects)
    two = Scene(objects=(_obj("circle", "red", 0, 0), _obj("circle", "red", 3, 0, "small")), background=40, noise=0)
    # two red circles: count 2; sizes and rows differ ("mixed", the last class); the column is shared
    assert train_toy.scene_summary(two)[pairs.index(("red", "circle"))].tolist() == [
        2, len(sizes) + 1, train_toy.GRID + 1, 0 + 1]


def test_scene_summary_relations_order_each_unique_pair():
    pairs, n = list(train_toy.PAIRS), len(train_toy.PAIRS)
    table = train_toy.scene_summary(SCENE, relations=True)
    assert table.shape == (n, len(train_toy.SUMMARY) + len(train_toy.RELATIONS))
    assert (table[:, :len(train_toy.SUMMARY)] == train_toy.scene_summary(SCENE)).all()
    rel = table[:, len(train_toy.SUMMARY):]
    rc, bc, gt = (pairs.index(p) for p in (("red", "circle"), ("blue", "circle"), ("green", "triangle")))
    # red circle (row 0, col 0) vs blue circle (row 1, col 2): left of (1) and above (1); the reverse is 2
    assert rel[rc, bc] == 1 and rel[rc, n + bc] == 1 and rel[bc, rc] == 2 and rel[bc, n + rc] == 2
    # blue circle (1, 2) vs green triangle (2, 1): right of (2), above (1)
    assert rel[bc, gt] == 2 and rel[bc, n + gt] == 1
    assert (rel[rc, [rc, n + rc]] == 0).all()  # never against itself
    ys = pairs.index(("yellow", "square"))  # absent
    assert (rel[ys] == 0).all() and (rel[:, ys] == 0).all()
    same_col = Scene(objects=(_obj("circle", "red", 0, 1), _obj("square", "blue", 3, 1),
                              _obj("circle", "green", 0, 2), _obj("circle", "green", 2, 3)), background=40, noise=0)
    rel = train_toy.scene_summary(same_col, relations=True)[:, len(train_toy.SUMMARY):]
    a, b, g = (pairs.index(p) for p in (("red", "circle"), ("blue", "square"), ("green", "circle")))
    assert rel[a, b] == 3 and rel[a, n + b] == 1  # same column, above
    assert (rel[g] == 0).all() and (rel[:, g] == 0).all()  # two green circles: not unique, no relation


def test_scene_summary_relations_agree_with_the_toy_answers():
    from schedsearch.toy.questions import spatial
    from schedsearch.toy.scenes import make_scene

    rng, checked = np.random.default_rng(3), 0
    n = len(train_toy.PAIRS)
    while checked < 200:
        scene = make_scene(rng)
        q = spatial(scene, rng)
        if q is None or not (" left of " in q["prompt"] or " above " in q["prompt"]):
            continue
        a, b = (train_toy.PAIRS.index(p) for p in train_toy.named_parts(q["prompt"])[:2])
        axis = 0 if " left of " in q["prompt"] else 1
        got = train_toy.scene_summary(scene, relations=True)[a, len(train_toy.SUMMARY) + axis * n + b]
        assert got == (1 if q["answer"] == "yes" else 2), q
        checked += 1


def test_question_probes_read_every_answer_position():
    from schedsearch.models.qwen_vl import QwenImageProcessor
    from schedsearch.testing.tiny import QWEN_TEMPLATE
    from schedsearch.toy.scenes import render

    tok = train_toy.build_tokenizer()
    proc = QwenImageProcessor(tok, train_toy.build_image_processor(), chat_template=QWEN_TEMPLATE)
    torch.manual_seed(0)
    model = train_toy.build_model(tok, 32, 4, 16, 20.0)
    probes = train_toy.QuestionProbes(32, 1, 2)
    handles = probes.attach(model)
    img = render(SCENE, np.random.default_rng(0))
    qs = [{"prompt": "is there a red circle ?", "answer": "yes"},
          {"prompt": "how many shapes are there ?", "answer": "4"}]
    items = [(img, qs, SCENE), (img, qs[:1], SCENE)]
    batch, labels, aux, _ = train_toy.Batcher(proc)(items)
    model(**batch, use_cache=False)
    word, summary = probes.losses(batch["input_ids"], tok.convert_tokens_to_ids("assistant"), items)
    assert word.ndim == 0 and summary.ndim == 0 and word > 0 and summary > 0
    with_rel = train_toy.QuestionProbes(32, 1, 2, relations=True)
    with_rel.captured = probes.captured
    _, summary_rel = with_rel.losses(batch["input_ids"], tok.convert_tokens_to_ids("assistant"), items)
    assert summary_rel > summary  # the relation columns add their own mean (about log 4 untrained) on top
    (word + summary).backward()
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad is not None  # reaches the decoder
    with pytest.raises(ValueError, match="answer positions"):
        probes.losses(batch["input_ids"], tok.convert_tokens_to_ids("assistant"), items[:1])
    for h in handles:
        h.remove()


def test_main_trains_with_the_question_probes(tmp_path):
    """The CLI wiring: --word-aux / --summary-aux (with --relations) losses are computed, logged per step, and the
    model is saved."""
    import csv

    log = tmp_path / "log"
    rc = train_toy.main(["--steps", "2", "--batch", "2", "--turns", "2", "--rope-theta", "20", "--warmup", "1",
                         "--word-aux", "1", "--summary-aux", "1", "--relations", "--eval-every", "0",
                         "--final-eval-n", "2",
                         "--hidden", "32", "--layers", "4", "--vision-hidden", "16", "--threads", "1",
                         "--out", str(tmp_path / "model"), "--log", str(log)])
    assert rc == 0
    rows = list(csv.DictReader(open(f"{log}.csv")))
    assert len(rows) == 2
    assert all(float(r["word_loss"]) > 0 and float(r["summary_loss"]) > 0 for r in rows)
    assert (tmp_path / "model" / "model.safetensors").exists()
