import openai

from tests.fake_upstream import FakeUpstream


def test_plain_completion_through_the_gateway(client: openai.OpenAI, fake: FakeUpstream) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "hello there"}])
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: hello there"
    assert raw.headers["x-thrifty-model"] == "gpt-4o"
    assert raw.headers["x-request-id"]
    assert fake.requests[-1].payload["messages"] == [{"role": "user", "content": "hello there"}]
