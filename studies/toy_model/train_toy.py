"""Train the shipped toy VLM: a real Qwen2_5_VLForConditionalGeneration, from scratch, on the toy task.

    # the shipped model (one run, CPU, 2 threads, 78 min on this 2-core machine; see studies/toy_model/train_toy.md)
    python studies/toy_model/train_toy.py --out schedsearch/toy/model --log studies/toy_model/results/train_toy \
        --steps 4200 --batch 16 --turns 3 --rope-theta 20 --pos-aux-layer 1 --bf16 --threads 2 --time-limit 5100 \
        --eval-every 250 --word-aux 1 --summary-aux 1 --keep-every 700
    python studies/toy_model/train_toy.py --out schedsearch/toy/model --log studies/toy_model/results/train_toy --report
    python studies/toy_model/train_toy.py --probe 20                                         # time 20 steps, exit

Recipe (studies/toy_model/train_toy.md has the measured curves, held-out figures and what was tried before):

* model: text decoder 8 layers (hidden ``--hidden``, GQA 4/2 heads, SwiGLU), vision tower 2 blocks
  (patch 4, 2x2 merge): a 128 px image gives 32 x 32 patches -> 16 x 16 = 256 visual tokens. The text
  RoPE base is ``--rope-theta``: Qwen2.5-VL gives the height / width mRoPE sections the *lowest* rotary
  frequencies, which at base 10000 and head dim 24 turn by < 0.1 rad across 16 tokens of width, so a
  small decoder cannot tell left from right; base 20 turns them by 1-3 rad;
* inputs built by the same processor class the loader uses (tokenizer + PIL image processor), with
  ``mm_token_type_ids`` so the decoder sees its 3-D mRoPE positions;
* loss = answer cross-entropy (answer tokens + ``<|im_end|>``) + ``--aux`` x auxiliary per-visual-token
  cross-entropies: a linear probe on the vision tower's merged outputs predicts the colour, shape and size
  of the object under each token and whether the token holds an object's centre (``AUX_VISION``); with
  ``--pos-aux-layer L`` a probe on decoder layer L's visual-token states predicts the token's scene-grid
  row / column (``AUX_POSITION``), so absolute position is carried from the 3-D positions early;
* ``--route-aux W`` (off in the shipped recipe; see studies/toy_model/train_toy.md for what it gave): a routing loss on
  the attention of the position that predicts each answer (first ``--route-heads`` heads of ``--route-layers``),
  pushed onto the visual tokens of the objects the question names (``referenced_objects``); needs eager
  attention in the text decoder (SDPA returns no weights), which costs ~15 % per step. ``--temporal-share``
  moves rotary pairs from the height / width mRoPE sections to the temporal one, whose dims match content
  independently of where the object is;
* ``--word-aux`` / ``--summary-aux`` (on in the shipped recipe) / ``--relations`` (off: the same run with it
  reached the same accuracy but lost only 18.2 points to the random 90 % drop, against 23.0 without;
  studies/toy_model/train_toy.md): linear probes at every answer
  position -- the question's colour / shape words at ``--word-layer``, and a question-independent table of the scene
  (``SUMMARY``, plus ``RELATIONS`` with ``--relations``) at ``--summary-layer``. Yes/no answers are balanced given
  the words alone and the image alone, so without them the answer loss gives no signal for reading the image
  (studies/toy_model/toy_credit.py); the probes are not saved with the model;
* ``--turns K``: K questions about one image as a multi-turn chat, all supervised (the image is encoded
  once for K answers); evaluation is single-turn, the format users and ``schedsearch.toy.eval`` use;
* curriculum: scenes with at most 2 objects for the first ``--curriculum`` steps, then 4, then up to 6;
  AdamW, linear warm-up then cosine decay (by steps or by ``--time-limit``, whichever is further);
  ``--bf16`` autocast; fixed seeds; samples drawn from the toy stream ``TRAIN_SEED`` (the held-out stream
  ``HELDOUT_SEED`` is never trained on).

Curves go to ``<log>.csv`` (step, loss, aux loss, train accuracy, lr, seconds) and held-out
evaluations to ``<log>.eval.jsonl``; ``--report`` writes ``<log>.heldout.json`` and the table ``<log>.heldout.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from schedsearch.testing.tiny import QWEN_SPECIALS, QWEN_TEMPLATE
from schedsearch.toy import HELDOUT_SEED, TRAIN_SEED, sample
from schedsearch.toy.questions import QTYPES, WORDS
from schedsearch.toy.scenes import COLOURS, GRID, IMAGE_SIZE, SHAPES, SIZES, label_map

PATCH, MERGE = 4, 2
TOKENS_SIDE = IMAGE_SIZE // (PATCH * MERGE)  # 16 -> 256 visual tokens


def build_tokenizer():
    from schedsearch.textvocab import build_word_tokenizer

    return build_word_tokenizer(WORDS + ["user", "assistant", "system"], special_tokens=QWEN_SPECIALS,
                                chat_template=QWEN_TEMPLATE, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def build_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    px = IMAGE_SIZE * IMAGE_SIZE
    return Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                    size={"shortest_edge": px, "longest_edge": px})


def build_model(tok, hidden: int, layers: int, vision_hidden: int, rope_theta: float = 10000.0,
                temporal_share: float = 1 / 3, tie: bool = True):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    heads = 4
    head_dim = hidden // heads
    # mRoPE sections (rotary pairs for temporal / height / width; they sum to head_dim / 2). Text tokens after
    # the image have equal t, h, w, so only the temporal section turns by the same angle for every visual token:
    # only its dims can match question to image content independently of where the object is.
    temporal = max(1, round(head_dim // 2 * temporal_share))
    spatial = (head_dim // 2 - temporal) // 2
    section = [head_dim // 2 - 2 * spatial, spatial, spatial]
    text = dict(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                vocab_size=len(tok), bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=tie,
                rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta),
                                 "mrope_section": section})
    vision = dict(depth=2, hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_heads=2,
                  out_hidden_size=hidden, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
                  window_size=PATCH * MERGE * 4, fullatt_block_indexes=[1], in_channels=3)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    return Qwen2_5_VLForConditionalGeneration(cfg)


#: per-visual-token auxiliary targets (name, classes): what the object covering the token is, and whether the
#: token holds the object's centre (one token per object, so counting reduces to counting flagged tokens)
AUX_VISION = (("colour", len(COLOURS) + 1), ("shape", len(SHAPES) + 1), ("size", len(SIZES) + 1), ("centre", 2))
#: targets read from a decoder layer's hidden state of each visual token: the row and column of the scene grid
#: cell the token lies in, so the decoder learns to carry absolute position from its 3-D mRoPE positions
AUX_POSITION = (("cell_row", GRID), ("cell_col", GRID))


def token_labels(scene) -> np.ndarray:
    """(256, 6) per merged visual token: colour, shape, size (0 = none) of the object covering at least a
    quarter of the token's 8 x 8 px cell, centre flag (1 = the object's centre pixel is in this token), and the
    grid cell row / column of the token."""
    lm = label_map(scene)
    s = PATCH * MERGE
    blocks = lm.reshape(TOKENS_SIDE, s, TOKENS_SIDE, s).transpose(0, 2, 1, 3).reshape(-1, s * s)
    out = np.zeros((blocks.shape[0], len(AUX_VISION) + len(AUX_POSITION)), dtype=np.int64)
    colours, sizes = list(COLOURS), list(SIZES)
    for t, blk in enumerate(blocks):
        vals, cnt = np.unique(blk[blk > 0], return_counts=True)
        if len(vals) and cnt.max() >= s * s // 4:
            o = scene.objects[int(vals[cnt.argmax()]) - 1]
            out[t, :3] = (colours.index(o.colour) + 1, SHAPES.index(o.shape) + 1, sizes.index(o.size) + 1)
    for o in scene.objects:
        out[int(o.cy) // s * TOKENS_SIDE + int(o.cx) // s, 3] = 1
    cell_tokens = TOKENS_SIDE // GRID
    rows, cols = np.divmod(np.arange(blocks.shape[0]), TOKENS_SIDE)
    out[:, 4], out[:, 5] = rows // cell_tokens, cols // cell_tokens
    return out


def token_objects(scene) -> np.ndarray:
    """(256,) int: 1 + index of the object covering at least a quarter of each merged visual token (or holding its
    centre pixel), 0 = background: the tokens a question about that object should be answered from."""
    lm = label_map(scene)
    s = PATCH * MERGE
    blocks = lm.reshape(TOKENS_SIDE, s, TOKENS_SIDE, s).transpose(0, 2, 1, 3).reshape(-1, s * s)
    out = np.zeros(blocks.shape[0], dtype=np.int64)
    for t, blk in enumerate(blocks):
        vals, cnt = np.unique(blk[blk > 0], return_counts=True)
        if len(vals) and cnt.max() >= s * s // 4:
            out[t] = int(vals[cnt.argmax()])
    for i, o in enumerate(scene.objects):
        out[int(o.cy) // s * TOKENS_SIDE + int(o.cx) // s] = i + 1
    return out


def named_parts(prompt: str) -> list[tuple[str | None, str | None]]:
    """(colour, shape) named by each part of a toy prompt ("red circle", "circles", "blue object", "shapes"; a
    relation "X left of Y" / "X above Y" has two parts), None where the part names no colour / shape."""
    from schedsearch.toy.questions import PLURAL

    singular = {v: k for k, v in PLURAL.items()}
    out = []
    for part in prompt.replace(" left of ", " | ").replace(" above ", " | ").split(" | "):
        words = part.split()
        colour = next((w for w in words if w in COLOURS), None)
        shape = next((singular.get(w, w) for w in words if w in SHAPES or w in singular), None)
        out.append((colour, shape))
    return out


def referenced_objects(scene, prompt: str) -> list[int]:
    """Indices of the objects a toy question is about, read off its words: each named part selects the objects
    with that colour and/or shape; a relation ("X left of Y", "X above Y") selects both. Empty for a presence
    question answered "no" (nothing to look at)."""
    found: set[int] = set()
    for colour, shape in named_parts(prompt):
        found |= {i for i, o in enumerate(scene.objects)
                  if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)}
    return sorted(found)


#: --word-aux: at every answer position, read from decoder layer --word-layer, the colour and shape words the
#: question names for its first and second object ("none" = class 0). Makes the answer position hold the
#: question's words early (studies/toy_model/toy_credit.py: with 256 visual tokens in the prompt that takes ~250 steps
#: even for an answer that depends on the word alone).
WORD_SLOTS = (("colour1", len(COLOURS) + 1), ("shape1", len(SHAPES) + 1),
              ("colour2", len(COLOURS) + 1), ("shape2", len(SHAPES) + 1))
#: --summary-aux: at every answer position, read from decoder layer --summary-layer, a question-independent table
#: of the scene: for each (colour, shape) pair, how many objects have it (0-6) and their size / grid row / grid
#: column (class 0 = none present, last class = several that differ). Yes/no questions are balanced given the
#: image alone and given the word alone, so the answer loss gives no first-order signal for gathering the image
#: content they need; this loss does (studies/toy_model/toy_credit.py, arm image-word-summary).
PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
SUMMARY = (("count", 7), ("size", len(SIZES) + 2), ("row", GRID + 2), ("col", GRID + 2))
#: --relations: the summary table gains, for every pair p and every other pair q, where p lies from q along each
#: axis (class 0 = p or q not exactly once in the scene, 1 = p left of / above q, 2 = right of / below,
#: 3 = same column / row). "is the red circle left of the blue square ?" is balanced given the words and given the
#: image alone, like presence; these columns make its answer a lookup in the table rather than a comparison of two
#: looked-up positions.
RELATIONS = tuple((f"{axis}:{c} {s}", 4) for axis in ("col", "row") for c, s in PAIRS)


def named_words(prompt: str) -> np.ndarray:
    """(4,) int: WORD_SLOTS classes of a toy prompt (1 + index into COLOURS / SHAPES, 0 = not named)."""
    colours, shapes = list(COLOURS), list(SHAPES)
    out = np.zeros(4, dtype=np.int64)
    for k, (colour, shape) in enumerate(named_parts(prompt)[:2]):
        out[2 * k] = colours.index(colour) + 1 if colour else 0
        out[2 * k + 1] = shapes.index(shape) + 1 if shape else 0
    return out


def scene_summary(scene, relations: bool = False) -> np.ndarray:
    """(len(PAIRS), 4) int: SUMMARY classes per (colour, shape) pair of the scene; with ``relations`` the
    RELATIONS columns follow (shape (len(PAIRS), 4 + len(RELATIONS)))."""
    fields = ((lambda o: o.size, list(SIZES)), (lambda o: o.row, list(range(GRID))),
              (lambda o: o.col, list(range(GRID))))
    out = np.zeros((len(PAIRS), len(SUMMARY)), dtype=np.int64)
    for p, (c, s) in enumerate(PAIRS):
        objs = [o for o in scene.objects if o.colour == c and o.shape == s]
        if not objs:
            continue
        out[p, 0] = min(len(objs), 6)
        for k, (get, values) in enumerate(fields, start=1):
            got = {get(o) for o in objs}
            out[p, k] = values.index(got.pop()) + 1 if len(got) == 1 else len(values) + 1
    if not relations:
        return out
    from schedsearch.toy.questions import _unique  # the objects relational questions may name

    uniq = [(PAIRS.index((o.colour, o.shape)), o) for o in _unique(scene)]
    rel = np.zeros((len(PAIRS), len(RELATIONS)), dtype=np.int64)
    for p, oa in uniq:
        for q, ob in uniq:
            if p == q:
                continue
            for k, axis in enumerate(("col", "row")):
                va, vb = getattr(oa, axis), getattr(ob, axis)
                rel[p, k * len(PAIRS) + q] = 1 if va < vb else 2 if va > vb else 3
    return np.concatenate([out, rel], axis=1)


class QuestionProbes(torch.nn.Module):
    """Linear probes at the answer positions for --word-aux / --summary-aux (training only, not saved)."""

    def __init__(self, hidden: int, word_layer: int, summary_layer: int, relations: bool = False):
        super().__init__()
        self.word_layer, self.summary_layer, self.relations = word_layer, summary_layer, relations
        self.word = torch.nn.Linear(hidden, sum(n for _, n in WORD_SLOTS))
        columns = SUMMARY + (RELATIONS if relations else ())
        self.summary = torch.nn.Linear(hidden, len(PAIRS) * sum(n for _, n in columns))
        self.captured: dict[int, torch.Tensor] = {}

    def attach(self, model) -> list:
        """Forward hooks that keep the outputs of the probed decoder layers; returns the handles."""
        def keep(layer):
            def hook(module, args, output):
                self.captured[layer] = output[0] if isinstance(output, tuple) else output
            return hook
        layers = model.model.language_model.layers
        return [layers[i].register_forward_hook(keep(i)) for i in sorted({self.word_layer, self.summary_layer})]

    def losses(self, input_ids, answer_id: int, items) -> tuple[torch.Tensor, torch.Tensor]:
        """(word loss, summary loss) over every answer position (the ``assistant`` token of each turn, in order)."""
        pos = input_ids == answer_id
        words, tables = [], []
        for _, qs, scene in items:
            qs = [qs] if isinstance(qs, dict) else qs
            table = scene_summary(scene, self.relations)
            for q in qs:
                words.append(named_words(q["prompt"]))
                tables.append(table)
        n = int(pos.sum())
        if n != len(words):
            raise ValueError(f"{n} answer positions for {len(words)} questions")
        dev = input_ids.device
        word_t = torch.from_numpy(np.stack(words)).to(dev)
        table_t = torch.from_numpy(np.stack(tables)).to(dev)
        w = self.word(self.captured[self.word_layer][pos].float())
        sm = self.summary(self.captured[self.summary_layer][pos].float()).reshape(n, len(PAIRS), -1)
        k = sum(n for _, n in SUMMARY)
        s_loss = AuxHeads._ce(sm[..., :k], table_t[..., :len(SUMMARY)], SUMMARY)
        if self.relations:  # its own mean, so the 24 relation columns do not dilute the 4 summary ones
            s_loss = s_loss + AuxHeads._ce(sm[..., k:], table_t[..., len(SUMMARY):], RELATIONS)
        return AuxHeads._ce(w, word_t, WORD_SLOTS), s_loss


class Batcher:
    """Builds training / evaluation batches through the loader's processor class (left padding)."""

    def __init__(self, proc, question_first: bool = False):
        self.proc = proc
        self.proc.tokenizer.padding_side = "left"
        self.question_first = question_first

    def prompt_text(self, prompt: str) -> str:
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)

    def __call__(self, items):
        """items: list of (image, [question, ...], scene) -> (batch, labels (B, N), aux (B, 256, 6), route).

        ``route`` = (positions (B, K): the position whose next-token prediction is turn k's first answer token,
        -1 where turn k is absent or its question names no object present; targets (B, K, 256): uniform over the
        visual tokens of the objects turn k's question is about).

        Several questions of one item become a multi-turn chat about its image (the image sits in the
        first user turn, exactly the single-turn evaluation format); every answer and its
        ``<|im_end|>`` is supervised. A bare question dict counts as one question.
        """
        tok = self.proc.tokenizer
        texts = []
        for _, qs, _ in items:
            qs = [qs] if isinstance(qs, dict) else qs
            conv = []
            for k, q in enumerate(qs):
                image = [{"type": "image"}] if k == 0 else []
                text = [{"type": "text", "text": q["prompt"]}]
                content = text + image if self.question_first else image + text
                conv.append({"role": "user", "content": content})
                conv.append({"role": "assistant", "content": q["answer"]})
            texts.append(self.proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=False))
        batch = self.proc(images=[im for im, _, _ in items], text=texts, padding=True, return_tensors="pt")
        batch.pop("token_type_ids", None)
        ids = batch["input_ids"]
        start, asst, end = (tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "assistant", "<|im_end|>"))
        labels = torch.full_like(ids, -100)
        kmax = max(1 if isinstance(qs, dict) else len(qs) for _, qs, _ in items)
        route_pos = torch.full((ids.shape[0], kmax), -1, dtype=torch.long)
        route_tgt = torch.zeros(ids.shape[0], kmax, TOKENS_SIDE * TOKENS_SIDE)
        for i in range(ids.shape[0]):
            row = ids[i].tolist()
            _, qs, scene = items[i]
            qs = [qs] if isinstance(qs, dict) else qs
            tok_obj = token_objects(scene)
            turn = 0
            j = 1
            while j < len(row):
                if row[j] == asst and row[j - 1] == start:
                    objs = referenced_objects(scene, qs[turn]["prompt"])
                    mask = np.isin(tok_obj, [o + 1 for o in objs]) if objs else np.zeros(len(tok_obj), bool)
                    if mask.any():
                        route_pos[i, turn] = j
                        route_tgt[i, turn] = torch.from_numpy(mask / mask.sum())
                    turn += 1
                    k = j + 1
                    while k < len(row) and row[k] != end:
                        k += 1
                    labels[i, j + 1 : k + 1] = ids[i, j + 1 : k + 1]  # answer tokens + <|im_end|>
                    j = k
                j += 1
        aux = torch.from_numpy(np.stack([token_labels(s) for _, _, s in items]))
        return batch, labels, aux, (route_pos, route_tgt)


def forced_qtype(seed: int, index: int, k: int, presence_share: float) -> str | None:
    """``"presence"`` for a ``presence_share`` fraction of questions (deterministic per (seed, index, k)), else
    None (the generator's uniform draw over the four types, so the default 0 changes nothing)."""
    if presence_share <= 0:
        return None
    return "presence" if np.random.default_rng([seed, index, k, 7]).random() < presence_share else None


def single_attribute_yesno(scene, rng: np.random.Generator) -> dict:
    """Training aid (not a held-out question type): "is there a red shape ?" / "is there a circle ?", yes / no
    balanced. One attribute, no binding: a yes/no question the image answers through the per-token features the
    vision probe already supervises."""
    from schedsearch.toy.scenes import COLOURS, SHAPES

    by_colour = bool(rng.integers(0, 2))
    values = list(COLOURS) if by_colour else list(SHAPES)
    present = sorted({o.colour if by_colour else o.shape for o in scene.objects})
    absent = [v for v in values if v not in present]
    yes = bool(rng.integers(0, 2)) or not absent
    v = (present if yes else absent)[int(rng.integers(0, len(present if yes else absent)))]
    prompt = f"is there a {v} shape ?" if by_colour else f"is there a {v} ?"
    return {"prompt": prompt, "answer": "yes" if yes else "no", "qtype": "presence1"}


def with_turns(item, seed: int, index: int, turns: int, presence_share: float = 0.0, single_share: float = 0.0):
    """Add ``turns - 1`` more questions about the same scene (drawn from their own (seed, index, k) stream)."""
    from schedsearch.toy.questions import make_question

    img, q, scene = item
    qs = [q]
    k = 0
    while len(qs) < turns:
        k += 1
        qrng = np.random.default_rng([seed, index, k])
        if single_share > 0 and np.random.default_rng([seed, index, k, 11]).random() < single_share:
            extra = single_attribute_yesno(scene, qrng)
        else:
            extra = make_question(scene, qrng, forced_qtype(seed, index, k, presence_share))
        if extra is not None:
            qs.append(extra)
    return img, qs, scene


def answer_logits_correct(logits, labels):
    """(B,) bool: every answer token (and <|im_end|>) is the argmax given the gold prefix == greedy exact match."""
    pred = logits[:, :-1].argmax(-1)
    tgt = labels[:, 1:]
    mask = tgt != -100
    return ((pred == tgt) | ~mask).all(-1)


def param_groups(model, head, decay_embeddings: bool = True, decay: float = 0.01) -> list[dict]:
    """AdamW groups. With ``decay_embeddings=False`` the embeddings (word rows and the vision patch embedding), the
    output head and the norm gains get no weight decay: decay shrinks the small differences between the rows of
    words that play one role (yes / no, the colour names), which collapsed in the tied shipped model
    (``studies/toy_model/toy_yesno.py``)."""
    params = list(model.parameters()) + list(head.parameters())
    if decay_embeddings:
        return [{"params": params, "weight_decay": decay}]
    plain = {id(p) for n, p in model.named_parameters()
             if "embed" in n or "norm" in n or n.endswith("lm_head.weight")}
    return [{"params": [p for p in params if id(p) not in plain], "weight_decay": decay},
            {"params": [p for p in params if id(p) in plain], "weight_decay": 0.0}]


class AuxHeads(torch.nn.Module):
    """Linear probes for the auxiliary per-visual-token losses (training only; not part of the saved model)."""

    def __init__(self, hidden: int, pos_layer: int):
        super().__init__()
        self.pos_layer = pos_layer
        self.vision = torch.nn.Linear(hidden, sum(n for _, n in AUX_VISION))
        self.position = torch.nn.Linear(hidden, sum(n for _, n in AUX_POSITION)) if pos_layer >= 0 else None

    @staticmethod
    def _ce(pred, targets, spec):
        parts = torch.split(pred, [n for _, n in spec], dim=-1)
        return sum(torch.nn.functional.cross_entropy(p.reshape(-1, p.shape[-1]), targets[..., k].reshape(-1))
                   for k, p in enumerate(parts)) / len(spec)


def route_loss(attentions, vis, route, layers, n_heads):
    """Cross-entropy of the routing target against the answer position's attention over the visual tokens.

    For each supervised layer, the first ``n_heads`` heads' attention rows at the position that predicts an
    answer's first token, renormalized over the visual tokens, are pushed towards the uniform distribution over
    the tokens of the objects the question names (``Batcher``'s ``route``). Only those heads are constrained;
    the others stay free. 0 when no turn has a target.
    """
    pos, tgt = route
    keep = pos >= 0
    if not keep.any():
        return torch.zeros((), device=tgt.device)
    b, k = pos.shape
    n_vis = tgt.shape[-1]
    vis_idx = vis.nonzero()[:, 1].reshape(b, n_vis)  # (B, 256) column of each visual token
    total = 0.0
    for layer in layers:
        att = attentions[layer][:, :n_heads].float()  # (B, h, L, L)
        h, seq = att.shape[1], att.shape[-1]
        rows = att.gather(2, pos.clamp(min=0)[:, None, :, None].expand(b, h, k, seq))  # (B, h, K, L)
        on_vis = rows.gather(3, vis_idx[:, None, None, :].expand(b, h, k, n_vis))  # (B, h, K, 256)
        logp = torch.log(on_vis / on_vis.sum(-1, keepdim=True).clamp(min=1e-12) + 1e-9)
        ce = -(tgt[:, None] * logp).sum(-1)  # (B, h, K)
        total = total + ce.mean(1)[keep].mean()
    return total / len(layers)


def forward(model, heads, batch, labels, aux, aux_weight, route=None, route_layers=(), route_heads=1):
    """Answer cross-entropy, auxiliary loss (vision-output probe + decoder-layer position probe [+ routing]),
    exact match."""
    captured = {}

    def grab(module, args, kwargs):
        captured["emb"] = kwargs.get("inputs_embeds")

    def grab_layer(module, args, output):
        captured["layer"] = output[0] if isinstance(output, tuple) else output

    hooks = [model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)]
    if aux_weight > 0 and heads.position is not None:
        hooks.append(model.model.language_model.layers[heads.pos_layer].register_forward_hook(grab_layer))
    try:
        out = model(**batch, use_cache=False, output_attentions=bool(route_layers))
    finally:
        for h in hooks:
            h.remove()
    logits = out.logits.float()
    lm = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                           ignore_index=-100)
    aux_loss = torch.zeros((), device=logits.device)
    if aux_weight > 0:
        vis = batch["input_ids"] == model.config.image_token_id
        b, n = aux.shape[:2]
        emb = captured["emb"][vis].reshape(b, n, -1)
        nv = len(AUX_VISION)
        aux_loss = heads._ce(heads.vision(emb.float()), aux[..., :nv], AUX_VISION)
        if heads.position is not None:
            hid = captured["layer"][vis].reshape(b, n, -1)
            aux_loss = (aux_loss + heads._ce(heads.position(hid.float()), aux[..., nv:], AUX_POSITION)) / 2
    r_loss = torch.zeros((), device=logits.device)
    if route_layers:
        vis = batch["input_ids"] == model.config.image_token_id
        r_loss = route_loss(out.attentions, vis, route, route_layers, route_heads)
    return lm, aux_loss, r_loss, answer_logits_correct(logits, labels)


@torch.no_grad()
def evaluate(model, batcher, n: int, device, bs: int = 50) -> dict:
    model.eval()
    per: dict[str, list[int]] = {t: [] for t in QTYPES}
    for s in range(0, n, bs):
        items = [sample(HELDOUT_SEED, i) for i in range(s, min(n, s + bs))]
        batch, labels, _, _ = batcher(items)
        out = model(**batch.to(device), use_cache=False)
        ok = answer_logits_correct(out.logits.float(), labels.to(device)).tolist()
        for (_, q, _), o in zip(items, ok, strict=True):
            per[q["qtype"]].append(int(o))
    model.train()
    allv = [v for vs in per.values() for v in vs]
    res = {"n": len(allv), "accuracy": sum(allv) / len(allv)}
    res.update({f"acc_{t}": (sum(v) / len(v) if v else None) for t, v in per.items()})
    return res


def save(model, tok, improc, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    improc.save_pretrained(out)
    pre = out / "preprocessor_config.json"
    data = json.loads(pre.read_text())
    data["processor_class"] = "Qwen2_5_VLProcessor"
    pre.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").write_text(QWEN_TEMPLATE)


def report(args) -> int:
    """Held-out figures of the saved model through the public loading path (what the issue asks for)."""
    import tempfile

    from schedsearch.calibration import load_manifest
    from schedsearch.models import load_model
    from schedsearch.toy import write_dataset
    from schedsearch.toy.eval import accuracy, random_drop_schedule

    adapter = load_model(args.out)
    res: dict = {"model": args.out, "heldout_seed": HELDOUT_SEED, "n": args.final_eval_n}
    with tempfile.TemporaryDirectory() as d:
        write_dataset(d, args.final_eval_n, seed=HELDOUT_SEED)
        samples = load_manifest(d)
        t = time.time()
        res["unpruned"] = accuracy(adapter, samples, batch_size=50)
        res["unpruned_seconds"] = round(time.time() - t, 1)
        for after in (2, 3):
            sched = random_drop_schedule(adapter, keep=0.1, after_layer=after, seed=0)
            res[f"random_keep0.1_from_layer{after}"] = accuracy(adapter, samples, schedule=sched, batch_size=50)
    for v in res.values():
        if isinstance(v, dict):
            v.pop("predictions", None)
    base = res["unpruned"]["overall"]
    for k in ("random_keep0.1_from_layer2", "random_keep0.1_from_layer3"):
        res[k]["drop_points"] = round(100 * (base - res[k]["overall"]), 2)
    out = Path(f"{args.log}.heldout.json")
    out.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    table = heldout_table(res)
    Path(f"{args.log}.heldout.md").write_text(table + "\n")
    print(table)
    return 0


def heldout_table(res: dict) -> str:
    """The markdown table of a ``--report`` result (``<log>.heldout.md``).

    README and studies/toy_model/train_toy.md embed it."""
    from schedsearch.toy.eval import region_halves

    def row(name: str, acc: dict) -> str:
        h, q = region_halves(acc), acc["by_qtype"]
        return (f"| {name} | {acc['overall']:.3f} | {q['presence']:.3f} | {q['counting']:.3f} | "
                f"{q['attribute']:.3f} | {q['spatial']:.3f} | {h['top']:.3f} | {h['bottom']:.3f} |")

    un, l2, l3 = res["unpruned"], res["random_keep0.1_from_layer2"], res["random_keep0.1_from_layer3"]
    h, q = region_halves(un), un["counts"]["qtype"]
    return "\n".join([
        f"Held-out figures (`--report`: greedy answers through `load_model(DIR)`, {un['n']} questions of stream "
        f"`HELDOUT_SEED`; presence {q['presence']}, counting {q['counting']}, attribute {q['attribute']}, spatial "
        f"{q['spatial']} of them, spatial ones about the top / bottom half {h['n_top']} / {h['n_bottom']}):", "",
        "| model | overall | presence | counting | attribute | spatial | top half | bottom half |",
        "|---|---|---|---|---|---|---|---|",
        row("unpruned", un),
        row("random 90 % of visual tokens dropped after layer 2", l2),
        row("random 90 % dropped after layer 3", l3),
        "| chance (uniform guess over the allowed answers) | ~0.35 | 0.5 | ~0.14 | ~0.33 | ~0.40 | | |", "",
        f"Dropping a random 90 % of the visual tokens after layer 2 costs {l2['drop_points']:.1f} points "
        f"(after layer 3: {l3['drop_points']:.1f}).",
    ])


def plot(logs: list[str], out: str) -> None:
    """Training loss (moving average) and held-out accuracy of one or more consecutive runs, in one PNG."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    offset = 0
    colours = dict(zip(["accuracy"] + [f"acc_{t}" for t in QTYPES], ["k", "C0", "C1", "C2", "C3"], strict=True))
    for n, log in enumerate(logs):
        rows = list(csv.DictReader(open(f"{log}.csv")))
        evs = [json.loads(x) for x in open(f"{log}.eval.jsonl")]
        loss = np.convolve([float(r["loss"]) for r in rows], np.ones(25) / 25, mode="valid")
        a1.plot([offset + 12 + i for i in range(len(loss))], loss, label=Path(log).name)
        for key, c in colours.items():
            a2.plot([offset + e["step"] for e in evs], [e[key] for e in evs], "o-", ms=3, color=c,
                    lw=2 if key == "accuracy" else 1, label=key.removeprefix("acc_") if n == 0 else None)
        # the next run starts from the checkpoint saved at this run's last evaluation
        offset += evs[-1]["step"]
    a1.set(xlabel="step", ylabel="answer CE (25-step mean)", yscale="log")
    a2.set(xlabel="step", ylabel="held-out exact match", ylim=(0, 1))
    a1.legend(fontsize=7)
    a2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--curriculum", type=int, default=300, help="steps with at most 2 objects per scene")
    ap.add_argument("--aux", type=float, default=1.0, help="weight of the per-visual-token auxiliary loss")
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vision-hidden", type=int, default=64)
    ap.add_argument("--rope-theta", type=float, default=10000.0, help="text decoder RoPE base (mRoPE)")
    ap.add_argument("--temporal-share", type=float, default=1 / 3,
                    help="share of the rotary pairs in the temporal mRoPE section (the rest split between height and "
                         "width); the temporal dims are the ones that match content position-independently")
    ap.add_argument("--pos-aux-layer", type=int, default=-1,
                    help="decoder layer whose visual-token states get the grid-position probe (-1 = none)")
    ap.add_argument("--route-aux", type=float, default=0.0,
                    help="weight of the routing loss: the answer position's attention (first --route-heads heads of "
                         "the --route-layers) is pushed onto the visual tokens of the objects the question names")
    ap.add_argument("--route-layers", default="3,5", help="decoder layers whose attention the routing loss supervises")
    ap.add_argument("--route-heads", type=int, default=1, help="how many heads per layer the routing loss constrains")
    ap.add_argument("--word-aux", type=float, default=0.0,
                    help="weight of the word probe: each answer position names the colour / shape words of its "
                         "question at decoder layer --word-layer (WORD_SLOTS)")
    ap.add_argument("--word-layer", type=int, default=2)
    ap.add_argument("--summary-aux", type=float, default=0.0,
                    help="weight of the scene-summary probe: each answer position predicts, at decoder layer "
                         "--summary-layer, every (colour, shape) pair's count, size, row and column (SUMMARY)")
    ap.add_argument("--relations", action="store_true",
                    help="the --summary-aux table also holds every pair of uniquely present (colour, shape) pairs' "
                         "left-of / above relation (RELATIONS)")
    ap.add_argument("--summary-layer", type=int, default=3)
    ap.add_argument("--question-first", action="store_true",
                    help="experiment only: the first question comes before the image in the prompt (the package's "
                         "loaders put images first, so a model trained this way is not the shipped format)")
    ap.add_argument("--presence-share", type=float, default=0.0,
                    help="experiment: this fraction of training questions are presence questions (0 = the "
                         "generator's uniform mix over the four types, about 1/4 each)")
    ap.add_argument("--single-yesno-share", type=float, default=0.0,
                    help="experiment: this fraction of the 2nd..last questions per image are single-attribute "
                         "yes/no questions ('is there a red shape ?'), a training aid outside the held-out types")
    ap.add_argument("--untie", action="store_true",
                    help="separate output head (tie_word_embeddings=False); tied, the rows of words that play the "
                         "same role (yes/no, colour names) collapse onto each other")
    ap.add_argument("--no-decay-embeddings", dest="decay_embeddings", action="store_false",
                    help="no weight decay on embeddings, the output head and norm gains")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast for forward/backward (weights and optimizer stay fp32; ~1.3x on AVX512-BF16)")
    ap.add_argument("--turns", type=int, default=1, help="questions per image (multi-turn chat), all supervised")
    ap.add_argument("--init-from", default=None, help="start from a saved model directory instead of random init")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=400)
    ap.add_argument("--final-eval-n", type=int, default=1000)
    ap.add_argument("--keep-every", type=int, default=0,
                    help="also keep a copy of the checkpoint every this many steps in <out>.steps/<step> (for "
                         "--report on several points of one run; 0 = off)")
    ap.add_argument("--probe", type=int, default=0, help="time this many steps and exit")
    ap.add_argument("--out", default="schedsearch/toy/model")
    ap.add_argument("--log", default="studies/toy_model/results/train_toy")
    ap.add_argument("--time-limit", type=float, default=75 * 60, help="stop training after this many seconds")
    ap.add_argument("--plot", nargs="+", default=None, metavar="LOG",
                    help="no training: plot the curves of these --log prefixes (consecutive runs) into <first>.png")
    ap.add_argument("--report", action="store_true",
                    help="no training: load the shipped model through load_model(DIR) and write held-out accuracy "
                         "(greedy generation, per type / region), unpruned and with a random 90%% drop after layer 2")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.report:
        return report(args)
    if args.plot:
        plot(args.plot, f"{args.plot[0]}.png")
        return 0
    torch.manual_seed(args.seed)
    from schedsearch.models.qwen_vl import QwenImageProcessor

    tok, improc = build_tokenizer(), build_image_processor()
    proc = QwenImageProcessor(tok, improc, chat_template=QWEN_TEMPLATE)
    batcher = Batcher(proc, question_first=args.question_first)
    device = torch.device(args.device)
    if args.init_from:
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.init_from, dtype=torch.float32)
        model = model.to(device).train()
    else:
        model = build_model(tok, args.hidden, args.layers, args.vision_hidden, args.rope_theta,
                            args.temporal_share, tie=not args.untie).to(device).train()
    route_layers = tuple(int(x) for x in args.route_layers.split(",")) if args.route_aux > 0 else ()
    if route_layers:  # attention weights are only returned by eager attention (SDPA does not materialize them)
        model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    head = AuxHeads(model.config.text_config.hidden_size, args.pos_aux_layer).to(device)
    probes = None
    if args.word_aux > 0 or args.summary_aux > 0:
        probes = QuestionProbes(model.config.text_config.hidden_size, args.word_layer, args.summary_layer,
                                args.relations).to(device)
        probes.attach(model)
    heads = torch.nn.ModuleList([head] + ([probes] if probes else []))  # every training-only probe
    answer_id = tok.convert_tokens_to_ids("assistant")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f} M, threads {torch.get_num_threads()}, device {device}", flush=True)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(param_groups(model, heads, args.decay_embeddings), lr=args.lr, betas=(0.9, 0.98))
    total = args.probe or args.steps

    t0 = time.time()

    def lr_at(step):
        """Linear warm-up, then cosine to 5 %; progress is the larger of steps done and time used, so the
        decay also completes when a slow machine hits --time-limit first."""
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = max((step - args.warmup) / max(1, total - args.warmup), (time.time() - t0) / args.time_limit)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))

    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    csv = None if args.probe else open(f"{log}.csv", "w")
    if csv:
        csv.write("step,loss,aux_loss,route_loss,train_acc,lr,max_objects,seconds,word_loss,summary_loss\n")
    idx = 0
    gen_t = 0.0
    for step in range(total):
        if args.curriculum <= 0:
            max_obj = 6
        else:
            max_obj = 2 if step < args.curriculum else (4 if step < 2 * args.curriculum else 6)
        tg = time.time()
        items = [with_turns(sample(TRAIN_SEED, idx + i, max_objects=max_obj,
                                   qtype=forced_qtype(TRAIN_SEED, idx + i, 0, args.presence_share)),
                            TRAIN_SEED, idx + i, args.turns, args.presence_share, args.single_yesno_share)
                 for i in range(args.batch)]
        idx += args.batch
        batch, labels, aux, route = batcher(items)
        gen_t += time.time() - tg
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            lm, aux_loss, r_loss, ok = forward(model, head, batch.to(device),
                                               labels.to(device), aux.to(device), args.aux,
                                               tuple(t.to(device) for t in route), route_layers, args.route_heads)
            w_loss = s_loss = torch.zeros((), device=device)
            if probes is not None:
                w_loss, s_loss = probes.losses(batch["input_ids"].to(device), answer_id, items)
        loss = lm + args.aux * aux_loss + args.route_aux * r_loss + args.word_aux * w_loss + args.summary_aux * s_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        el = time.time() - t0
        if csv:
            csv.write(f"{step},{lm.item():.4f},{aux_loss.item():.4f},{r_loss.item():.4f},"
                      f"{ok.float().mean().item():.4f},{lr:.6f},{max_obj},{el:.1f},{w_loss.item():.4f},"
                      f"{s_loss.item():.4f}\n")
        if step % 25 == 0 or args.probe:
            print(f"step {step} loss {lm.item():.3f} aux {aux_loss.item():.3f} route {r_loss.item():.3f} "
                  f"word {w_loss.item():.3f} summary {s_loss.item():.3f} "
                  f"acc {ok.float().mean().item():.2f} "
                  f"{el:.0f}s ({el / (step + 1):.2f} s/step, data {gen_t / (step + 1):.2f})", flush=True)
            if csv:
                csv.flush()
        if not args.probe and args.eval_every and (step + 1) % args.eval_every == 0:
            ev = evaluate(model, batcher, args.eval_n, device)
            ev.update(step=step + 1, seconds=round(time.time() - t0, 1))
            print("eval", json.dumps(ev), flush=True)
            with open(f"{log}.eval.jsonl", "a") as f:
                f.write(json.dumps(ev) + "\n")
            save(model.cpu(), tok, improc, Path(args.out))  # checkpoint: a killed run still leaves a model
            model.to(device)
        if not args.probe and args.keep_every and (step + 1) % args.keep_every == 0:
            save(model.cpu(), tok, improc, Path(f"{args.out}.steps") / str(step + 1))
            model.to(device)
        if el > args.time_limit:
            print(f"time limit reached at step {step + 1}", flush=True)
            break
    if args.probe:
        return 0
    save(model.cpu(), tok, improc, Path(args.out))
    model.to(device)
    ev = evaluate(model, batcher, args.final_eval_n, device)
    ev.update(step=step + 1, seconds=round(time.time() - t0, 1), final=True)
    print("final", json.dumps(ev), flush=True)
    with open(f"{log}.eval.jsonl", "a") as f:
        f.write(json.dumps(ev) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
