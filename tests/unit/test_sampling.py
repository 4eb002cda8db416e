import math

import pytest
import torch

from cluster.errors import InputError
from cluster.generation.sampling import make_generator, probabilities, sample
from cluster.generation.types import SamplingParams


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, r"temperature=-0\.1 is invalid: pass a number in \[0, 100\]"),
        ({"temperature": math.inf}, r"temperature=inf is invalid"),
        ({"temperature": math.nan}, r"temperature=nan is invalid"),
        ({"temperature": 100.5}, r"temperature=100\.5 is invalid"),
        ({"temperature": "1"}, r"temperature='1' is invalid"),
        ({"top_k": -1}, r"top_k=-1 is invalid: pass an integer >= 0"),
        ({"top_k": 2.0}, r"top_k=2\.0 is invalid"),
        ({"top_p": 0.0}, r"top_p=0\.0 is invalid: pass a number in \(0, 1\]"),
        ({"top_p": 1.01}, r"top_p=1\.01 is invalid"),
        ({"top_p": math.nan}, r"top_p=nan is invalid"),
        ({"seed": -1}, r"seed=-1 is invalid: pass None or an integer in \[0, 2\*\*63\)"),
        ({"seed": 2**63}, r"seed=9223372036854775808 is invalid"),
        ({"seed": 1.5}, r"seed=1\.5 is invalid"),
    ],
)
def test_params_refuse_out_of_range_values_naming_the_parameter(kwargs, message):
    with pytest.raises(InputError, match=message):
        SamplingParams(**kwargs)


def test_params_defaults_are_greedy_and_accept_the_edges():
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.5).greedy
    edge = SamplingParams(temperature=100, top_k=0, top_p=1.0, seed=2**63 - 1)
    assert edge.seed == 2**63 - 1 and not edge.greedy
    with pytest.raises(Exception):
        edge.temperature = 1.0  # frozen


def test_make_generator_is_seeded_or_fresh():
    a = torch.rand(4, generator=make_generator(123))
    b = torch.rand(4, generator=make_generator(123))
    assert torch.equal(a, b)
    fresh = [torch.rand(4, generator=make_generator(None)) for _ in range(2)]
    assert not torch.equal(fresh[0], fresh[1])
    assert make_generator(0).device.type == "cpu"
    with pytest.raises(InputError, match="seed=-3"):
        make_generator(-3)


def test_greedy_is_one_hot_argmax_with_lowest_index_on_ties():
    logits = torch.tensor([[[0.1, 2.0, -1.0, 2.0]], [[5.0, 5.0, 0.0, 1.0]]])  # [2, 1, 4], ties
    probs = probabilities(logits, SamplingParams())
    assert probs.dtype == torch.float32 and probs.shape == (2, 1, 4)
    assert probs.tolist() == [[[0.0, 1.0, 0.0, 0.0]], [[1.0, 0.0, 0.0, 0.0]]]


def test_temperature_scales_the_logits_before_softmax():
    logits = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64)
    for temperature in (0.5, 1.0, 3.0):
        got = probabilities(logits, SamplingParams(temperature=temperature))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, torch.softmax(logits / temperature, -1).float())
    # Tiny temperatures approach greedy without overflowing to NaN.
    cold = probabilities(torch.tensor([1000.0, 999.0, -1000.0]), SamplingParams(temperature=1e-6))
    assert cold.tolist() == [1.0, 0.0, 0.0]


def test_top_k_keeps_exactly_k_and_renormalises():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 10, generator=gen)
    probs = probabilities(logits, SamplingParams(temperature=0.7, top_k=3))
    assert ((probs > 0).sum(-1) == 3).all()
    kept = torch.topk(logits, 3, dim=-1).indices
    assert torch.equal(torch.sort(torch.topk(probs, 3, dim=-1).indices, -1).values, torch.sort(kept, -1).values)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 5))
    # The kept tokens keep their relative odds.
    full = torch.softmax(logits / 0.7, -1)
    mask = probs > 0
    torch.testing.assert_close(probs[mask], (full * mask / (full * mask).sum(-1, keepdim=True))[mask])
    # top_k at or above the vocabulary keeps everything.
    torch.testing.assert_close(probabilities(logits, SamplingParams(temperature=0.7, top_k=10)), full)
    torch.testing.assert_close(probabilities(logits, SamplingParams(temperature=0.7, top_k=50)), full)
    # Tokens tied with the k-th largest stay in.
    tied = probabilities(torch.tensor([1.0, 1.0, 1.0, 0.0]), SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(tied, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))


def test_top_p_keeps_the_minimal_nucleus():
    logits = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).log()
    cases = {
        0.5: [1.0, 0, 0, 0, 0],  # 0.5 alone reaches 0.5
        0.51: [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0],
        0.7: [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0],
        0.8: [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0],
        0.96: [0.5 / 1.0, 0.2, 0.15, 0.1, 0.05],
        0.01: [1.0, 0, 0, 0, 0],  # always at least the most likely token
    }
    for top_p, expected in cases.items():
        got = probabilities(logits, SamplingParams(temperature=1.0, top_p=top_p))
        torch.testing.assert_close(got, torch.tensor(expected), msg=f"top_p={top_p}")


def test_top_p_works_per_row_with_unsorted_vocab_and_after_top_k():
    logits = torch.tensor([[0.05, 0.5, 0.1, 0.2, 0.15], [0.25, 0.25, 0.25, 0.15, 0.10]]).log()
    got = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.6))
    torch.testing.assert_close(got[0], torch.tensor([0, 0.5 / 0.7, 0, 0.2 / 0.7, 0]))
    assert ((got[1] > 0).sum() == 3) and got[1, 3:].sum() == 0
    both = probabilities(logits[:1], SamplingParams(temperature=1.0, top_k=3, top_p=0.99))
    torch.testing.assert_close(both[0], torch.tensor([0, 0.5, 0, 0.2, 0.15]) / 0.85)


def test_probabilities_sum_to_one_for_random_settings():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(64, 32, generator=gen) * 4
    for params in (
        SamplingParams(),
        SamplingParams(temperature=0.3, top_k=5),
        SamplingParams(temperature=1.7, top_p=0.4),
        SamplingParams(temperature=1.0, top_k=7, top_p=0.9),
    ):
        probs = probabilities(logits, params)
        assert probs.shape == (64, 32) and (probs >= 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(64))


def test_probabilities_refuse_bad_logits():
    with pytest.raises(InputError, match="pass floating-point logits"):
        probabilities(torch.tensor([1, 2, 3]), SamplingParams())
    with pytest.raises(InputError, match=r"shape \(\): pass a tensor \[\.\.\., vocab\]"):
        probabilities(torch.tensor(1.0), SamplingParams())


def test_sample_is_reproducible_for_a_seeded_generator():
    probs = torch.softmax(torch.randn(16, 50, generator=torch.Generator().manual_seed(1)), -1)
    first = sample(probs, make_generator(42))
    second = sample(probs, make_generator(42))
    assert first.dtype == torch.long and first.shape == (16,)
    assert torch.equal(first, second)
    assert sample(torch.eye(4), make_generator(3)).tolist() == [0, 1, 2, 3]
    assert sample(torch.empty(0, 4), make_generator(3)).shape == (0,)
    with pytest.raises(InputError, match=r"shape \(4,\): pass a tensor \[batch, vocab\]"):
        sample(torch.ones(4), make_generator(3))


def test_sample_follows_the_distribution():
    target = torch.tensor([0.05, 0.3, 0.1, 0.25, 0.2, 0.1])
    draws = sample(target.expand(20_000, 6), make_generator(2024))
    frequencies = torch.bincount(draws, minlength=6).float() / draws.numel()
    assert (frequencies - target).abs().max() < 0.015, frequencies.tolist()


# -- defaults: one home for the library, the request and the gateway ---------------------------

def test_defaults_resolve_wire_zeros_and_are_what_requests_and_the_library_use():
    import inspect

    from cluster.generation.api import stream_generate
    from cluster.generation.defaults import DEFAULTS, GenerationDefaults
    from cluster.generation.types import GenerationRequest

    assert (DEFAULTS.max_new_tokens, DEFAULTS.temperature, DEFAULTS.top_k, DEFAULTS.top_p) == (64, 0.0, 0, 1.0)
    assert (DEFAULTS.speculation_length, DEFAULTS.max_new_tokens_limit, DEFAULTS.speculation_length_limit) == (0, 4096, 16)
    assert DEFAULTS.resolve(max_new_tokens=0, top_p=0.0, speculation_length=0) == (64, 1.0, 0)  # 0: adaptive
    assert DEFAULTS.resolve(max_new_tokens=7, top_p=0.5, speculation_length=2) == (7, 0.5, 2)
    assert SamplingParams() == SamplingParams(DEFAULTS.temperature, DEFAULTS.top_k, DEFAULTS.top_p) and SamplingParams().greedy
    request = GenerationRequest(((1, 2),))
    assert (request.max_new_tokens, request.speculation_length, request.stop_sequences) == (64, 0, ())
    params = inspect.signature(stream_generate).parameters
    assert params["max_new_tokens"].default is None and params["speculation_length"].default is None  # None: DEFAULTS
    with pytest.raises(ValueError, match="speculation_length"):
        GenerationDefaults(speculation_length=17)
