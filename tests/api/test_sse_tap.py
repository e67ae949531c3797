"""StreamTap: SSE bytes split into events however they arrive, usage read from whichever
chunk carries it, thrifty's own usage chunk hidden, [DONE] held back for the cost comment."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from proxy.api.sse import StreamTap, cost_comment

BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
Event = dict[str, Any] | str
USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 0}}


def chunk(delta: dict[str, Any] | None = None, *, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {**BASE, "choices": choices, **extra}


def sse(events: list[Event], sep: bytes = b"\n\n") -> bytes:
    out = b""
    for event in events:
        body = event.encode() if isinstance(event, str) else orjson.dumps(event)
        out += b"data: " + body + sep
    return out


CONTENT = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hello"}),
    chunk({"content": " world"}),
    chunk({}, finish="stop"),
]
STREAM: list[Event] = [*CONTENT, chunk(None, usage=USAGE), "[DONE]"]


def relay(tap: StreamTap, data: bytes, cuts: list[int] | None = None) -> bytes:
    points = sorted(set(cuts or []))
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    return b"".join(tap.feed(piece) for piece in pieces)


def events(relayed: bytes) -> list[dict[str, Any]]:
    assert relayed.endswith(b"\n\n") or relayed == b""
    return [orjson.loads(e.removeprefix(b"data: ")) for e in relayed.split(b"\n\n") if e]


@given(
    hide=st.booleans(),
    crlf=st.booleans(),
    cuts=st.lists(st.integers(0, len(sse(STREAM, b"\r\n\r\n"))), max_size=40),
)
def test_any_split_of_the_stream_relays_the_same_events(hide: bool, crlf: bool, cuts: list[int]) -> None:
    data = sse(STREAM, b"\r\n\r\n" if crlf else b"\n\n")
    whole = StreamTap(hide)
    expected = relay(whole, data)
    split = StreamTap(hide)
    assert relay(split, data, [c for c in cuts if c <= len(data)]) == expected
    assert split.usage == whole.usage == USAGE
    assert split.done and whole.done
    assert split.text() == whole.text() == ["", "Hello", " world"]


@given(cuts=st.lists(st.integers(0, 400), max_size=60))
def test_single_bytes_and_crlf_cut_between_cr_and_lf_are_handled(cuts: list[int]) -> None:
    data = sse(STREAM, b"\r\n\r\n")
    tap = StreamTap(hide_usage=True)
    out = relay(tap, data, [c for c in cuts if c <= len(data)])
    assert b"\r" not in out
    assert [e["choices"][0]["delta"] for e in events(out)] == [c["choices"][0]["delta"] for c in CONTENT]
    assert tap.done and tap.usage == USAGE


def test_every_byte_on_its_own_with_crlf() -> None:
    data = sse(STREAM, b"\r\n\r\n")
    tap = StreamTap(hide_usage=False)
    out = relay(tap, data, list(range(1, len(data))))
    assert events(out) == [*CONTENT, chunk(None, usage=USAGE)]
    assert tap.done


def test_usage_only_chunk_is_read_and_hidden_when_thrifty_asked_for_it() -> None:
    tap = StreamTap(hide_usage=True)
    out = relay(tap, sse(STREAM))
    assert events(out) == CONTENT
    assert b"usage" not in out
    assert tap.usage == USAGE


def test_usage_only_chunk_is_kept_when_the_client_asked_for_it() -> None:
    tap = StreamTap(hide_usage=False)
    out = relay(tap, sse(STREAM))
    assert events(out) == [*CONTENT, chunk(None, usage=USAGE)]
    assert tap.usage == USAGE


def test_usage_on_a_chunk_that_also_carries_choices_is_read() -> None:
    # PEERS #36168: the last chunk carries both the final choice and the usage.
    last = chunk({"content": "!"}, finish="stop", usage=USAGE)
    stream: list[Event] = [*CONTENT[:3], last, "[DONE]"]

    hidden = StreamTap(hide_usage=True)
    out = events(relay(hidden, sse(stream)))
    assert hidden.usage == USAGE
    assert out[-1]["choices"] == last["choices"] and "usage" not in out[-1]
    assert hidden.text() == ["", "Hello", " world", "!"]

    kept = StreamTap(hide_usage=False)
    out = events(relay(kept, sse(stream)))
    assert kept.usage == USAGE
    assert out[-1] == last
    assert kept.text() == hidden.text()


def test_null_usage_on_content_chunks_does_not_erase_the_real_usage() -> None:
    # OpenAI sends "usage": null on every chunk once include_usage is on.
    stream: list[Event] = [*(dict(c, usage=None) for c in CONTENT), chunk(None, usage=USAGE), "[DONE]"]
    tap = StreamTap(hide_usage=True)
    out = events(relay(tap, sse(stream)))
    assert len(out) == len(CONTENT)
    assert tap.usage == USAGE


def test_done_is_withheld_and_flagged() -> None:
    tap = StreamTap(hide_usage=True)
    data = sse(STREAM)
    before_done = data[: data.index(b"data: [DONE]")]
    assert b"[DONE]" not in tap.feed(before_done)
    assert not tap.done
    assert tap.feed(b"data: [DONE]\n\n") == b""
    assert tap.done


def test_an_incomplete_trailing_event_is_held_back() -> None:
    tap = StreamTap(hide_usage=False)
    first = sse([CONTENT[1]])
    assert tap.feed(first + b'data: {"id": "chatcmpl-1", "choi') == first
    assert tap.feed(b'ces": []}\n') == b""
    assert tap.feed(b"\n") == b'data: {"id": "chatcmpl-1", "choices": []}\n\n'


def test_comments_and_other_event_lines_pass_through() -> None:
    tap = StreamTap(hide_usage=True)
    data = b": keep-alive\n\nevent: message\ndata: " + orjson.dumps(CONTENT[1]) + b"\n\n"
    assert tap.feed(data) == data
    assert tap.text() == ["Hello"]


def test_text_returns_content_and_tool_call_arguments() -> None:
    calls = [
        chunk(
            {
                "role": "assistant",
                "tool_calls": [
                    {"index": 0, "id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
                ],
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({}, finish="tool_calls"),
    ]
    tap = StreamTap(hide_usage=True)
    events: list[Event] = [CONTENT[1], *calls, "[DONE]"]
    relay(tap, sse(events))
    assert "".join(tap.text()) == 'Helloget_weather{"city": "Paris"}'


def test_cost_comment_is_an_sse_comment() -> None:
    assert cost_comment("0.000001000", "-0.000000500") == b": thrifty cost_usd=0.000001000 savings_usd=-0.000000500\n\n"
