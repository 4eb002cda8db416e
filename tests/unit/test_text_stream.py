"""Streamed text for Generate: stop sequences never leak part-way, held text is flushed at the end."""

from transformers import AutoTokenizer

from actors.gateway.text import TextStream
from cluster.models.pair import pair_path

TOKENIZER = AutoTokenizer.from_pretrained(pair_path())
TEXT = "The for statement is used to iterate over the elements of a sequence."
IDS = TOKENIZER(TEXT, add_special_tokens=False)["input_ids"]


def _stream(stops):
    stream = TextStream(TOKENIZER, stops)
    events = []
    for token in IDS:
        events += stream.push(token)
        if stream.stopped:
            break
    events += stream.finish()
    return stream, events


def test_without_stops_every_token_arrives_once_with_all_the_text():
    stream, events = _stream(())
    assert [t for t, _ in events] == IDS
    assert "".join(p for _, p in events) == TOKENIZER.decode(IDS) and not stream.stopped


def test_a_stop_sequence_spanning_tokens_is_never_sent_in_part():
    stop = "elements of"  # several tokens: its first ones must be held back, then dropped
    stream, events = _stream((stop,))
    text = "".join(p for _, p in events)
    assert stream.stopped and text == TOKENIZER.decode(IDS)[: TOKENIZER.decode(IDS).index(stop)]
    assert stop[:3] not in text[-3:]


def test_text_that_only_looks_like_a_stop_start_is_released():
    stream, events = _stream(("over the top",))  # "over the " is held, then released: no stop
    assert not stream.stopped and "".join(p for _, p in events) == TOKENIZER.decode(IDS)


def test_a_token_goes_out_as_it_is_pushed_unless_it_leaves_text_held():
    stream = TextStream(TOKENIZER, ("over the top",))
    sent = [stream.push(token) for token in IDS]
    assert [t for t, _ in sent[0]] == [IDS[0]]  # the first token at once, not with the second
    held = TOKENIZER.decode(IDS).index("over")
    assert all(len(events) == 1 for events in sent[:3])
    # "over" (and " the") could begin the stop: its token waits for the next one to decide
    holding = next(i for i in range(len(IDS)) if len(TOKENIZER.decode(IDS[: i + 1])) > held)
    assert sent[holding] == []
