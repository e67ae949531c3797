"""Token counting with tiktoken, offline (litellm's bundled BPE files), for when no usage comes back."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import tiktoken

from proxy.cost.tokens import TokenCounter, litellm_tokenizer_dir

ROOT = Path(__file__).resolve().parents[2]

# OpenAI cookbook, "How to count tokens with tiktoken": 129 tokens for gpt-4, 124 for gpt-4o,
# both as counted by the API.
COOKBOOK = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.",
    },
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    counter = TokenCounter()
    counter.warm()
    return counter


def test_encodings_load_offline_from_litellms_package() -> None:
    script = textwrap.dedent(
        """
        import os
        from proxy.cost.tokens import TokenCounter
        counter = TokenCounter()
        counter.warm()
        print(os.environ["TIKTOKEN_CACHE_DIR"])
        print(counter.count_text("hello world", "gpt-4o"), counter.count_text("hello world", "gpt-4"))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}
    # any download attempt fails fast through a proxy that is not there
    env |= {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    directory, counts = done.stdout.splitlines()
    assert directory == str(litellm_tokenizer_dir())
    assert counts == "2 2"


def test_an_explicit_tiktoken_cache_dir_is_respected() -> None:
    script = "import os; from proxy.cost.tokens import TokenCounter; TokenCounter(); print(os.environ['TIKTOKEN_CACHE_DIR'])"
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": "/tmp/somewhere-else"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "/tmp/somewhere-else"


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("openai/gpt-4.1-mini", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("llama3.1:8b", "o200k_base"),
        ("claude-sonnet-4-5", "o200k_base"),
    ],
)
def test_each_model_family_gets_its_encoding(counter: TokenCounter, model: str, encoding: str) -> None:
    assert counter.encoding_for(model).name == encoding


def test_text_is_counted_with_the_models_encoding(counter: TokenCounter) -> None:
    text = "Thrifty prices every request, even the ones that stream. 東京 🙂"
    assert counter.count_text(text, "gpt-4o") == len(tiktoken.get_encoding("o200k_base").encode(text))
    assert counter.count_text(text, "gpt-4") == len(tiktoken.get_encoding("cl100k_base").encode(text))
    assert counter.count_text("", "gpt-4o") == 0


def test_special_token_text_is_counted_not_refused(counter: TokenCounter) -> None:
    assert counter.count_text("<|endoftext|>", "gpt-4o") > 1


@pytest.mark.parametrize(("model", "expected"), [("gpt-4", 129), ("gpt-4o", 124)])
def test_messages_are_counted_as_openais_api_counts_them(counter: TokenCounter, model: str, expected: int) -> None:
    assert counter.count_messages(COOKBOOK, model) == expected


def test_message_framing_per_message_and_reply_primer(counter: TokenCounter) -> None:
    enc = tiktoken.get_encoding("o200k_base")
    one = [{"role": "user", "content": "hi there"}]
    assert counter.count_messages(one, "gpt-4o") == 3 + 3 + len(enc.encode("user")) + len(enc.encode("hi there"))
    assert counter.count_messages([], "gpt-4o") == 3


def test_content_parts_images_and_tool_calls_are_counted(counter: TokenCounter) -> None:
    enc = tiktoken.get_encoding("o200k_base")
    parts: list[dict[str, Any]] = [
        {"type": "text", "text": "what is in this picture?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/b.png"}},
    ]
    with_images = counter.count_messages([{"role": "user", "content": parts}], "gpt-4o")
    text_only = counter.count_messages([{"role": "user", "content": parts[:1]}], "gpt-4o")
    assert with_images - text_only == 2 * 85

    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    base = counter.count_messages([{"role": "assistant", "content": None}], "gpt-4o")
    with_call = counter.count_messages([{"role": "assistant", "content": None, "tool_calls": [call]}], "gpt-4o")
    assert with_call - base == len(enc.encode("get_weather")) + len(enc.encode('{"city": "Paris"}'))


def test_malformed_messages_do_not_raise(counter: TokenCounter) -> None:
    messages: list[Any] = ["not a message", {"role": "user", "content": 42}, {"role": "tool", "tool_calls": [None, "x"]}]
    assert counter.count_messages(messages, "gpt-4o") > 3
