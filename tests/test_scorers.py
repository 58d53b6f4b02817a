"""The ``diverse`` scorer (max-min diversity with a spatial term) on hand-made score contexts."""

from __future__ import annotations

import itertools

import pytest
import torch

from schedsearch.errors import ScheduleError
from schedsearch.runtime.scorers import Diverse, ScoreContext, build_scorer


def _ctx(h: torch.Tensor, n_keep: int, coords: torch.Tensor | None = None) -> ScoreContext:
    """A context whose alive sequence is one text token followed by the visual tokens ``h`` (B, V, D)."""
    bsz, v, d = h.shape
    hs = torch.cat([torch.zeros(bsz, 1, d), h], dim=1)
    vis = torch.arange(1, v + 1).expand(bsz, v)
    return ScoreContext(layer=None, layer_idx=0, hidden_states=hs, cos=None, sin=None,
                        key_valid=torch.ones(bsz, v + 1, dtype=torch.bool), visual_local=vis,
                        visual_orig=vis - 1, text_mask=torch.zeros(bsz, v + 1, dtype=torch.bool), n_keep=n_keep,
                        head_dim=d, num_heads=1, num_kv_heads=1, coords=coords)


def _grid(side: int, images: int = 1) -> torch.Tensor:
    """(1, images * side**2, 3) coords in raster order, cell centres in [0, 1)."""
    cells = [(i, (r + 0.5) / side, (c + 0.5) / side) for i in range(images) for r in range(side) for c in range(side)]
    return torch.tensor(cells)[None]


def _greedy_by_hand(h: torch.Tensor, coords: torch.Tensor, spatial: float, n: int) -> list[int]:
    """The max-min greedy written out with Python loops over one sample (the definition in Diverse's docstring)."""
    v = h.shape[0]

    def dist(i: int, j: int) -> float:
        cos = float(torch.nn.functional.cosine_similarity(h[i], h[j], dim=0))
        if coords[i, 0] == coords[j, 0]:
            space = float(((coords[i, 1:] - coords[j, 1:]) ** 2).sum().sqrt())
        else:
            space = 2**0.5
        return 1 - cos + spatial * space

    mean = h.mean(0)
    picks = [min(range(v), key=lambda i: float(torch.nn.functional.cosine_similarity(h[i], mean, dim=0)))]
    while len(picks) < n:
        rest = [i for i in range(v) if i not in picks]
        picks.append(max(rest, key=lambda i: min(dist(i, j) for j in picks)))
    return picks


@pytest.mark.parametrize("spatial", [0.0, 0.7, 5.0])
def test_matches_the_greedy_written_by_hand(spatial):
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(2, 18, 8, generator=gen)
    coords = _grid(3, images=2).expand(2, -1, -1)  # two 3x3 images per sample
    n = 7
    scores = Diverse(spatial)(_ctx(h, n, coords))
    for b in range(2):
        order = torch.argsort(scores[b], descending=True)[:n].tolist()
        assert order == _greedy_by_hand(h[b], coords[b], spatial, n)
        assert int((scores[b] > 0).sum()) == n  # exactly n_keep tokens ranked, all others 0


def test_without_space_it_keeps_one_token_per_cluster():
    """DivPrune's distance (spatial 0): two near-duplicate groups -> the first two picks come one from each."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    h = torch.stack([a + 0.01 * torch.randn(16, generator=gen) for _ in range(6)]
                    + [b + 0.01 * torch.randn(16, generator=gen) for _ in range(2)])[None]
    scores = Diverse(0.0)(_ctx(h, 2))
    kept = set(torch.nonzero(scores[0]).flatten().tolist())
    assert len(kept & {0, 1, 2, 3, 4, 5}) == 1 and len(kept & {6, 7}) == 1


def test_with_identical_states_it_spreads_over_the_image():
    """Identical states leave only the spatial term: 4 picks on a 6x6 grid are its 4 corners."""
    h = torch.ones(1, 36, 4)
    scores = Diverse(2.0)(_ctx(h, 4, _grid(6)))
    kept = sorted(torch.nonzero(scores[0]).flatten().tolist())
    assert kept == [0, 5, 30, 35]


def test_batch_rows_are_independent():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(3, 16, 6, generator=gen)
    coords = _grid(4).expand(3, -1, -1)
    both = Diverse(1.0)(_ctx(h, 5, coords))
    for b in range(3):
        assert torch.equal(both[b], Diverse(1.0)(_ctx(h[b : b + 1], 5, coords[:1]))[0])


def test_edge_cases_and_errors():
    h = torch.randn(1, 9, 4)
    assert torch.equal(Diverse(1.0)(_ctx(h, 0, _grid(3))), torch.zeros(1, 9))
    assert int((Diverse(1.0)(_ctx(h, 9, _grid(3))) > 0).sum()) == 9
    with pytest.raises(ScheduleError, match="coordinates"):
        Diverse(1.0)(_ctx(h, 3, None))
    with pytest.raises(ScheduleError, match="spatial"):
        Diverse(-1.0)
    assert build_scorer("diverse", {"spatial": None}).spatial == 1.0  # null = the default
    assert build_scorer("diverse", {"spatial": 4}).spatial == 4.0


def test_search_scorer_choices_are_valid_schedule_scorers():
    from schedsearch.schedule import Scorer
    from schedsearch.search.methods import SCORER_CHOICES

    for key, sc in SCORER_CHOICES.items():
        Scorer(name=sc["name"], params=sc["params"])  # the schedule contract accepts it
        assert build_scorer(sc["name"], sc["params"]).name == sc["name"], key
    spatial = [sc["params"]["spatial"] for sc in SCORER_CHOICES.values() if sc["name"] == "diverse"]
    assert len(spatial) >= 2 and all(a < b for a, b in itertools.pairwise(spatial))


def test_written_schedules_carry_the_current_schema_version(tiny_dir, tmp_path):
    """A schedule that may use a 1.1 scorer must say 1.1: the writers take SCHEMA_VERSION, not a literal."""
    from schedsearch.models import load_model
    from schedsearch.schedule import SCHEMA_VERSION, load_schedule
    from schedsearch.testing.tiny import schedule_for

    ad = load_model(tiny_dir("qwen2_5_vl"))
    sched = schedule_for(ad, [1.0] + [0.5] * (ad.num_layers - 1), scorer="diverse", params={"spatial": 4.0})
    assert sched.schema_version == SCHEMA_VERSION == "1.4"
    sched.save(tmp_path / "s.json")
    assert load_schedule(tmp_path / "s.json").scorer.name == "diverse"


def test_registry_rows_build_and_name_their_class():
    """Every row of the scorer registry imports, builds with its defaults and carries its registry name."""
    from schedsearch.scorer_specs import SCORERS

    for name in SCORERS:
        assert build_scorer(name, {}).name == name


@pytest.mark.parametrize(("name", "params", "needle"), [
    ("last_token_attention", {"rope": "no"}, "scorer.params.rope='no' is not a boolean"),
    ("random", {"seed": 2**40}, "scorer.params.seed=1099511627776 is outside"),
    ("diverse", {"spatal": 1.0}, "scorer.params.spatal is not a parameter of scorer 'diverse'"),
    ("nonsense", {}, "scorer.name='nonsense' is not known"),
])
def test_build_scorer_checks_params_like_validate(name, params, needle):
    with pytest.raises(ScheduleError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        build_scorer(name, params)
