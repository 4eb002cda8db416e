"""How a rank call's large arguments travel (actors.rank_group): through the object store, once."""

import numpy as np
import pytest
import ray

from actors.rank_group import _INLINE_BYTES, _shared

pytestmark = pytest.mark.integration


def test_a_large_argument_goes_through_the_object_store(ray_cluster):
    weights = {"w": np.arange(_INLINE_BYTES // 8 + 1, dtype=np.float64)}
    sent = _shared(weights)
    assert isinstance(sent, ray.ObjectRef)
    assert np.array_equal(ray.get(sent)["w"], weights["w"])
