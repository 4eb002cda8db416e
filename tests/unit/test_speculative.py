import pytest
import torch

from cluster.errors import InputError
from cluster.generation.sampling import make_generator
from cluster.generation.speculative import SpeculationStats, verify_draft
from tests.support import check_matches, draw, random_probs


def expected_greedy_output(proposals, target_probs):
    """The target's own greedy tokens, one row at a time."""
    rows = []
    for row_tokens, row_p in zip(proposals.tolist(), target_probs):
        out = []
        for i, token in enumerate(row_tokens):
            choice = int(row_p[i].argmax())
            out.append(choice)
            if token != choice:
                break
        else:
            out.append(int(row_p[len(row_tokens)].argmax()))
        rows.append(out)
    return rows


def test_greedy_emits_exactly_the_targets_greedy_tokens():
    gen = torch.Generator().manual_seed(11)
    batch, k, vocab = 200, 4, 5
    target = random_probs((batch, k + 1, vocab), gen)
    draft = random_probs((batch, k, vocab), gen)
    # Proposals that often agree with the target, so every acceptance length occurs.
    agree = torch.rand(batch, k, generator=gen) < 0.7
    proposals = torch.where(agree, target[:, :k].argmax(-1), draw(draft, gen))
    tokens, n_accepted = verify_draft(proposals, draft, target, make_generator(0), greedy=True)
    expected = expected_greedy_output(proposals, target)
    assert tokens.dtype == torch.long and tokens.shape == (batch, k + 1) and n_accepted.shape == (batch,)
    for b in range(batch):
        n = int(n_accepted[b])
        assert tokens[b, : n + 1].tolist() == expected[b]
        assert tokens[b, n + 1 :].tolist() == [-1] * (k - n)
    assert set(n_accepted.tolist()) == set(range(k + 1))


def test_greedy_uses_no_randomness():
    gen = torch.Generator().manual_seed(5)
    target, draft = random_probs((8, 3, 6), gen), random_probs((8, 2, 6), gen)
    proposals = draw(draft, gen)
    generator = make_generator(9)
    state = generator.get_state()
    verify_draft(proposals, draft, target, generator, greedy=True)
    assert torch.equal(generator.get_state(), state)


def test_rows_accept_different_numbers_in_one_batch():
    vocab, k = 4, 3
    one_hot = torch.eye(vocab)
    # The target is certain at every position: it wants 1, 2, 3, then 0.
    target = torch.stack([one_hot[1], one_hot[2], one_hot[3], one_hot[0]]).expand(4, k + 1, vocab)
    draft = torch.full((4, k, vocab), 1 / vocab)
    proposals = torch.tensor([[1, 2, 3], [1, 2, 0], [1, 0, 0], [3, 2, 3]])
    expected_tokens = [[1, 2, 3, 0], [1, 2, 3, -1], [1, 2, -1, -1], [1, -1, -1, -1]]
    for greedy in (True, False):
        tokens, n_accepted = verify_draft(proposals, draft, target, make_generator(1), greedy=greedy)
        assert n_accepted.tolist() == [3, 2, 1, 0]
        assert tokens.tolist() == expected_tokens


def test_sampled_verify_is_reproducible_and_rejects_tokens_the_target_never_picks():
    gen = torch.Generator().manual_seed(3)
    target, draft = random_probs((64, 4, 7), gen), random_probs((64, 3, 7), gen)
    target[:, 0, 2] = 0.0
    target = target / target.sum(-1, keepdim=True)
    proposals = draw(draft, gen)
    proposals[:, 0] = 2
    first = verify_draft(proposals, draft, target, make_generator(77), greedy=False)
    second = verify_draft(proposals, draft, target, make_generator(77), greedy=False)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert (first[1] == 0).all() and (first[0][:, 0] != 2).all()


def test_identical_draft_and_target_accept_everything():
    gen = torch.Generator().manual_seed(4)
    target = random_probs((500, 4, 6), gen)
    proposals = draw(target[:, :3], gen)
    tokens, n_accepted = verify_draft(proposals, target[:, :3], target, make_generator(8), greedy=False)
    assert (n_accepted == 3).all() and torch.equal(tokens[:, :3], proposals)


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((2, 3), (2, 3, 5), (2, 3, 5)), r"target_probs \(2, 3, 5\): expected"),
        (((2, 3), (2, 3, 4), (2, 4, 5)), r"draft_probs \(2, 3, 4\)"),
        (((2, 3), (1, 3, 5), (2, 4, 5)), r"draft_probs \(1, 3, 5\)"),
        (((2,), (2, 3, 5), (2, 4, 5)), r"draft_tokens \(2,\)"),
        (((2, 0), (2, 0, 5), (2, 1, 5)), r"no proposals to verify"),
    ],
)
def test_shapes_are_validated(shapes, message):
    tokens_shape, draft_shape, target_shape = shapes
    with pytest.raises(InputError, match=message):
        verify_draft(
            torch.zeros(tokens_shape, dtype=torch.long),
            torch.full(draft_shape, 0.2),
            torch.full(target_shape, 0.2),
            make_generator(0),
            greedy=False,
        )


def test_token_ids_are_validated():
    draft, target = torch.full((1, 2, 5), 0.2), torch.full((1, 3, 5), 0.2)
    with pytest.raises(InputError, match=r"outside \[0, 5\)"):
        verify_draft(torch.tensor([[0, 5]]), draft, target, make_generator(0), greedy=False)
    with pytest.raises(InputError, match="pass integer token ids"):
        verify_draft(torch.tensor([[0.0, 1.0]]), draft, target, make_generator(0), greedy=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_verify_is_lossless(seed):
    """The emitted tokens follow the target, whatever the draft proposes."""
    gen = torch.Generator().manual_seed(100 + seed)
    batch, k, vocab = 40_000, 3, 6
    target = random_probs((k + 1, vocab), gen, sharpness=1.5)  # the same p for every row, independent of the prefix
    draft = 0.5 * target[:k] + 0.5 * random_probs((k, vocab), gen, sharpness=1.5)  # a draft that half agrees
    draft[0, int(target[0].argsort()[-2])] = 0.0  # and never proposes the target's second favourite first token
    draft = draft / draft.sum(-1, keepdim=True)
    assert (target[0] - draft[0]).abs().max() > 0.1  # sampling from the draft alone would fail the check
    proposals = draw(draft.expand(batch, k, vocab), gen)
    tokens, n_accepted = verify_draft(
        proposals, draft.expand(batch, k, vocab), target.expand(batch, k + 1, vocab), make_generator(seed), greedy=False
    )
    assert 0 < (n_accepted == 0).float().mean() < 1 and (n_accepted == k).any()
    check_matches(tokens[:, 0], target[0], tolerance=0.01)
    second = tokens[n_accepted >= 1, 1]
    assert second.numel() > batch // 4
    check_matches(second, target[1], tolerance=0.015)
    # The expected acceptance of the first proposal is sum_x min(p(x), q(x)).
    expected_rate = torch.minimum(target[0], draft[0]).sum()
    assert abs((n_accepted >= 1).float().mean() - expected_rate) < 0.01


def test_speculation_stats_arithmetic():
    stats = SpeculationStats()
    assert stats.acceptance_rate == 0.0 and stats.mean_accepted_length == 0.0
    stats.add(4, 3)
    stats.add(4, 1)
    assert (stats.proposed, stats.accepted, stats.steps) == (8, 4, 2)
    assert stats.acceptance_rate == 0.5
    assert stats.mean_accepted_length == 3.0  # (3 + 1 + 1 + 1) / 2 rounds
    batch = SpeculationStats()
    batch.add(12, 6, rows=3)  # one round over three rows
    assert batch.steps == 3 and batch.mean_accepted_length == 3.0
    merged = stats.merge(batch)
    assert (merged.proposed, merged.accepted, merged.steps) == (20, 10, 5)
    assert not merged.draft_lost
    lost = SpeculationStats(target_only_steps=2).merge(SpeculationStats(target_only_steps=3))
    assert lost.target_only_steps == 5 and lost.draft_lost and lost.acceptance_rate == 0.0
    assert (stats.proposed, batch.proposed) == (8, 12)  # merge leaves both unchanged
    assert merged.as_dict() == {
        "proposed": 20,
        "accepted": 10,
        "steps": 5,
        "target_only_steps": 0,
        "acceptance_rate": 0.5,
        "mean_accepted_length": 3.0,
    }
    with pytest.raises(InputError, match="accepted=5 exceeds proposed=4"):
        stats.add(4, 5)
    with pytest.raises(InputError, match="proposed=-1 is invalid"):
        stats.add(-1, 0)
    assert (stats.proposed, stats.accepted, stats.steps) == (8, 4, 2)
