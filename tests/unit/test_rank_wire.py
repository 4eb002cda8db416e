"""How a rank call's arguments travel (actors.rank_actor, actors.rank_group): an argument every rank
gets is serialised once, small ones inside the call (no object-store round trip), and each rank gets
back what was sent. A large argument's trip through the object store needs a cluster:
tests/integration/test_rank_wire.py."""

import torch

from actors.rank_actor import Pickled, from_wire, to_wire
from actors.rank_group import _shared
from cluster.generation.layout import DecoderLayout
from cluster.generation.plan import DecodeSteps
from cluster.generation.types import SamplingParams


def test_a_small_plan_travels_pickled_once_and_comes_back_equal():
    plan = DecodeSteps((5,), (40,), (8,), DecoderLayout(verify_tokens=5), (SamplingParams(temperature=0.7),),
                       (3,), (40,), (2,))
    sent = _shared(plan)
    assert isinstance(sent, Pickled)
    assert from_wire((sent,))[0] == plan


def test_plain_values_and_small_arrays_go_as_they_are():
    ids = to_wire(torch.arange(6).reshape(2, 3))
    assert _shared(7) == 7 and _shared("decode") == "decode"
    assert _shared(ids) is ids  # Ray sends small arrays in the call without pickling them
    back = from_wire((ids,))[0]
    assert isinstance(back, torch.Tensor) and back.tolist() == [[0, 1, 2], [3, 4, 5]]
    back[0, 0] = 9  # writable and owned: not a view of what was received
    assert ids[0, 0] == 0

