"""Bad input raises ValueError/TypeError on every rank before any message, with a sentence that
names the broken precondition and its numbers (Design, *Errors*). One launch checks every method."""

import torch

import sptutor
from sptutor import launch, ledger
from sptutor.mesh import UspMesh

SOFTMAX = ("ring", "rsa", "lss", "ulysses")
LINEAR = ("lasp", "lasp2")
ULYSSES_RULE = "ValueError: ulysses needs Hq % U == 0 and (Hkv % U == 0 or U % Hkv == 0), got"
COMMON = {  # what every softmax method says; each call below uses S/W = 3 on W = 4, so S = 12
    # (but the zigzag call: one token per rank, S = 4 < 2W)
    "zigzag": "ValueError: zigzag layout needs S >= 2*W (2W chunks of at least one token), got "
    "S=4, W=4",
    "heads": "ValueError: need Hq % Hkv == 0, got Hq=2, Hkv=3",
    "sequence": "ValueError: q and k must have one sequence length, got 3 and 4",
    "dtype": "TypeError: q, k, v need one floating dtype",
    "backend": "ValueError: backend must be one of",
}
EXPECTED = {(method, what): message for method in SOFTMAX for what, message in COMMON.items()}
EXPECTED |= {
    ("ulysses", "heads"): "ValueError: need Hq % Hkv == 0, got Hq=4, Hkv=3",  # 4 heads split
    ("ulysses", "kv heads"): f"{ULYSSES_RULE} Hq=12, Hkv=3, U=4",
    ("ulysses", "q heads"): f"{ULYSSES_RULE} Hq=6, Hkv=6, U=4",
    ("usp", "heads"): f"{ULYSSES_RULE} Hq=6, Hkv=3, U=2",
    ("usp", "zigzag"): COMMON["zigzag"],
    ("usp", "layout"): "ValueError: layout must be one of",
    ("usp", "no mesh"): "TypeError: usp needs the UspMesh that make_usp_mesh returns, got NoneType",
    ("usp", "U·R != W"): "ValueError: usp needs U*R == W with U, R >= 1, got U=3, R=1, W=4",
    ("usp", "groups"): "ValueError: mesh groups must hold U=4 and R=1 ranks, got ulysses_group "
    "of 2 and ring_group of 2",
    ("usp", "sequence"): COMMON["sequence"],
    ("usp", "dtype"): COMMON["dtype"],
    ("usp", "backend"): COMMON["backend"],
}
EXPECTED |= {
    (method, what): message
    for method in LINEAR
    for what, message in {
        "non-causal decay": "ValueError: decay needs causal=True",
        "decay needs grad": "ValueError: decay must not require grad",
        "decay shape": "ValueError: decay must have shape (Hq,) = (2,), got (3,)",
        "decay range": "ValueError: decay must lie in (0, 1], got min=1.5, max=1.5",
        "dtype": COMMON["dtype"],
        "sequence": "ValueError: q and k must have one sequence length, got 3 and 2",
        "backend": COMMON["backend"],
    }.items()
}


def _softmax_calls(method, q):
    attention = getattr(sptutor, f"{method}_attention")
    kv3, k4 = torch.randn(1, 3, 3, 8), torch.randn(1, 4, 2, 8)
    calls = {
        "zigzag": lambda: attention(q[:, :1], q[:, :1], q[:, :1], layout="zigzag"),
        "heads": lambda: attention(q, kv3, kv3),
        "sequence": lambda: attention(q, k4, k4),
        "dtype": lambda: attention(q, q.double(), q.double()),
        "backend": lambda: attention(q, q, q, backend="cuda-magic"),
    }
    if method == "ulysses":
        q12, kv3x = torch.randn(1, 3, 12, 8), torch.randn(1, 3, 3, 8)
        calls["kv heads"] = lambda: attention(q12, kv3x, kv3x)
        calls["q heads"] = lambda: attention(*[torch.randn(1, 3, 6, 8)] * 3)
    return calls


def _usp_calls(q):
    square, line = sptutor.make_usp_mesh(2, 2), sptutor.make_usp_mesh(1, 4)  # collective
    k4, kv3 = torch.randn(1, 4, 2, 8), torch.randn(1, 3, 3, 8)
    usp = sptutor.usp_attention
    return {
        "heads": lambda: usp(torch.randn(1, 3, 6, 8), kv3, kv3, mesh=square),
        "zigzag": lambda: usp(q[:, :1], q[:, :1], q[:, :1], mesh=line, layout="zigzag"),
        "layout": lambda: usp(q, q, q, mesh=square, layout="diagonal"),
        "no mesh": lambda: usp(q, q, q, mesh=None),
        "U·R != W": lambda: usp(
            q, q, q, mesh=UspMesh(3, 1, square.ulysses_group, square.ring_group)
        ),
        "groups": lambda: usp(q, q, q, mesh=UspMesh(4, 1, square.ulysses_group, square.ring_group)),
        "sequence": lambda: usp(q, k4, k4, mesh=square),
        "dtype": lambda: usp(q, q.double(), q.double(), mesh=square),
        "backend": lambda: usp(q, q, q, mesh=square, backend="cuda-magic"),
    }


def _linear_calls(method, q):
    attention = getattr(sptutor, f"{method}_attention")
    decay = torch.full((2,), 0.9)
    return {
        "non-causal decay": lambda: attention(q, q, q, causal=False, decay=decay),
        "decay needs grad": lambda: attention(q, q, q, decay=decay.clone().requires_grad_()),
        "decay shape": lambda: attention(q, q, q, decay=torch.full((3,), 0.9)),
        "decay range": lambda: attention(q, q, q, decay=torch.full((2,), 1.5)),
        "dtype": lambda: attention(q, q.double(), q.double()),
        "sequence": lambda: attention(q, q[:, :2], q[:, :2]),
        "backend": lambda: attention(q, q, q, backend="cuda-magic"),
    }


def _every_bad_call(rank, world):
    """On each rank: every bad call's error ('Type: message', None if it did not raise), and the
    number of ledger events they produced (must be 0)."""
    q = torch.randn(1, 3, 2, 8)  # this rank's shard: S/W = 3, Hq = 2, D = 8
    q4 = torch.randn(1, 3, 4, 8)  # Ulysses splits heads over W = 4: give it 4
    calls = {
        (m, what): call
        for m in SOFTMAX
        for what, call in _softmax_calls(m, q4 if m == "ulysses" else q).items()
    }
    calls |= {("usp", what): call for what, call in _usp_calls(q).items()}
    calls |= {(m, what): call for m in LINEAR for what, call in _linear_calls(m, q).items()}
    errors = {}
    with ledger.record() as led:
        for key, call in calls.items():
            try:
                call()
                errors[key] = None
            except (ValueError, TypeError) as error:
                errors[key] = f"{type(error).__name__}: {error}"
    return errors, len(led.events)


def test_every_method_rejects_bad_input_before_any_message():
    """Layouts, heads, lengths, dtypes, backends, meshes, decays: each raises on every rank with
    the numbers, and nothing reaches the wire."""
    for errors, events in launch.spawn(_every_bad_call, 4):
        assert events == 0
        assert set(errors) == set(EXPECTED)
        for key, message in errors.items():
            assert message is not None, f"{key} did not raise"
            assert message.startswith(EXPECTED[key]), f"{key}: {message}"
