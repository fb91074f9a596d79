"""Real USP on 4 gloo processes (every U x R mesh of W 1..4) == its oracle, message by message."""

import torch
from hypothesis import Phase, given, settings

import sptutor
from sptutor import launch, ledger
from sptutor.mesh import UspMesh
from sptutor.testing import Case
from tests.dist.harness import GROUPS, assert_real_matches_oracle, ulysses_case_lists
from tests.dist.test_ulysses import assert_saved_is_o_s_over_w

# saved bytes over S, W and every U·R = W: Hq = Hkv = 12 split over every U, nothing replicated
SAVED_GRID = [
    Case("usp", members, "contiguous", False, 1, seq_len, 12, 12, 4, "float32", ulysses=degree)
    for members in GROUPS
    for degree in range(1, len(members) + 1)
    if len(members) % degree == 0
    for seq_len in (12, 24)
]


@settings(max_examples=2, phases=[Phase.explicit, Phase.generate], deadline=None)
@given(ulysses_case_lists("usp", per_mesh=2))
def test_real_usp_matches_the_oracle_and_the_cost(cases):
    """W 1..4, every U·R = W, layouts, causal, MHA/GQA/MQA, float64/float32: shards, ledger, and
    bytes sent and saved (hooks) == oracle == sptutor.cost; saved is O(S/W) whatever U."""
    results = assert_real_matches_oracle(cases + SAVED_GRID)
    assert_saved_is_o_s_over_w(SAVED_GRID, results[len(cases) :])


def _bad_calls(rank, world):
    """Each bad call must raise before any message: the ledger stays empty."""
    square, line = sptutor.make_usp_mesh(2, 2), sptutor.make_usp_mesh(1, 4)  # collective
    q = torch.randn(1, 3, 2, 8)  # S/W = 3, so S = 12 over W = 4
    calls = {
        "heads": lambda: sptutor.usp_attention(
            torch.randn(1, 3, 6, 8), *[torch.randn(1, 3, 3, 8)] * 2, mesh=square
        ),
        "zigzag": lambda: sptutor.usp_attention(q, q, q, mesh=line, layout="zigzag"),
        "layout": lambda: sptutor.usp_attention(q, q, q, mesh=square, layout="diagonal"),
        "no mesh": lambda: sptutor.usp_attention(q, q, q, mesh=None),
        "U·R != W": lambda: sptutor.usp_attention(
            q, q, q, mesh=UspMesh(3, 1, square.ulysses_group, square.ring_group)
        ),
        "groups": lambda: sptutor.usp_attention(
            q, q, q, mesh=UspMesh(4, 1, square.ulysses_group, square.ring_group)
        ),
        "sequence": lambda: sptutor.usp_attention(q, *[torch.randn(1, 4, 2, 8)] * 2, mesh=square),
        "dtype": lambda: sptutor.usp_attention(q, q.double(), q.double(), mesh=square),
        "backend": lambda: sptutor.usp_attention(q, q, q, mesh=square, backend="cuda-magic"),
    }
    messages = {}
    with ledger.record() as led:
        for name, call in calls.items():
            try:
                call()
                messages[name] = None
            except (ValueError, TypeError) as error:
                messages[name] = f"{type(error).__name__}: {error}"
    return messages, len(led.events)


def test_bad_input_raises_before_any_communication():
    """Bad heads, layouts, meshes, shapes, dtypes, backends raise on every rank, sending nothing."""
    for messages, events in launch.spawn(_bad_calls, 4):
        assert events == 0
        assert messages["heads"] == (
            "ValueError: ulysses needs Hq % U == 0 and (Hkv % U == 0 or U % Hkv == 0), "
            "got Hq=6, Hkv=3, U=2"
        )
        assert messages["zigzag"] == "ValueError: zigzag layout needs S % (2*W) == 0, got S=12, W=4"
        assert messages["layout"].startswith("ValueError: layout must be one of")
        assert messages["no mesh"] == (
            "TypeError: usp needs the UspMesh that make_usp_mesh returns, got NoneType"
        )
        assert messages["U·R != W"] == (
            "ValueError: usp needs U*R == W with U, R >= 1, got U=3, R=1, W=4"
        )
        assert messages["groups"] == (
            "ValueError: mesh groups must hold U=4 and R=1 ranks, got ulysses_group of 2 and "
            "ring_group of 2"
        )
        assert messages["sequence"] == (
            "ValueError: q and k must have one sequence length, got 3 and 4"
        )
        assert messages["dtype"].startswith("TypeError: q, k, v need one floating dtype")
        assert "backend must be one of" in messages["backend"]
