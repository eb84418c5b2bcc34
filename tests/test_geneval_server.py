"""The GenEval reward-server client against a fake server on loopback (tests/fake_geneval_server.py)."""

from __future__ import annotations

import os
import pickle
import socket

import pytest
import torch
from fake_geneval_server import FakeGenEvalServer

from reward_models.geneval_server import (
    DEFAULT_URL,
    URL_ENV,
    GenEvalServerReward,
    RewardServerError,
    restricted_loads,
)

FAST = {"timeout": 2.0, "backoff": 0.01}  # generous timeout on a busy machine; tiny backoff


def gray(values: list[int]) -> torch.Tensor:
    """8x8 uniform grey images; JPEG keeps them exact, so the fake's score is the value itself."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 8, 8) / 255


def metas(n: int, tags: list[str] | None = None) -> tuple[list[str], list[dict]]:
    """Prompts and matching GenEval metadata, tagged single_object unless tags are given."""
    tags = tags or ["single_object"] * n
    prompts = [f"a photo of {i} cats" for i in range(n)]
    entries = [
        {"tag": tag, "include": [{"class": "cat", "count": 1}], "exclude": [], "prompt": prompt}
        for tag, prompt in zip(tags, prompts, strict=True)
    ]
    return prompts, entries


def call(reward: GenEvalServerReward, values: list[int]) -> torch.Tensor:
    prompts, meta = metas(len(values))
    return reward(gray(values), prompts, meta)


def test_batches_of_64_keep_order():
    values = list(range(150))
    fake = FakeGenEvalServer()
    with fake as url:
        out = call(GenEvalServerReward(url, **FAST), values)
    assert fake.batch_sizes == [64, 64, 22]
    assert fake.wires == ["json"] * 3 and fake.only_strict == [True] * 3
    assert out.dtype == torch.float32 and out.tolist() == [float(v) for v in values]


@pytest.mark.parametrize("wire", ["json", "pickle"])
@pytest.mark.parametrize("reply", ["json", "pickle"])
def test_wire_formats(wire, reply):
    fake = FakeGenEvalServer(reply=reply)
    with fake as url:
        out = call(GenEvalServerReward(url, wire=wire, **FAST), [10, 200])
    assert fake.wires == [wire]
    assert out.tolist() == [10.0, 200.0]


def test_strict_and_standard_scores():
    values = [30, 100, 200]
    with FakeGenEvalServer() as url:
        strict = call(GenEvalServerReward(url, score="strict", **FAST), values)
        standard = call(GenEvalServerReward(url, score="standard", only_strict=False, **FAST), values)
    assert strict.tolist() == [0.0, 0.0, 1.0]
    assert standard.tolist() == [0.0, 1.0, 1.0]


def test_standard_score_needs_only_strict_false():
    with pytest.raises(ValueError, match="only_strict=False"):
        GenEvalServerReward(score="standard")


def test_retry_succeeds_after_two_503():
    fake = FakeGenEvalServer(fail_first=2)
    with fake as url:
        out = call(GenEvalServerReward(url, retries=3, **FAST), [50])
    assert fake.requests == 3 and out.tolist() == [50.0]


def test_gives_up_after_retries():
    fake = FakeGenEvalServer(fail_first=100)
    with fake as url, pytest.raises(RewardServerError) as info:
        call(GenEvalServerReward(url, retries=2, **FAST), [50])
    message = str(info.value)
    assert fake.requests == 3
    assert url in message and "3 attempt" in message and "HTTP 503" in message and URL_ENV in message


def test_timeout_is_retried_then_reported():
    fake = FakeGenEvalServer(delay=0.6)
    with fake as url, pytest.raises(RewardServerError, match="2 attempt.*timed out"):
        call(GenEvalServerReward(url, timeout=0.2, retries=1, backoff=0.01), [50])
    assert fake.requests == 2


def test_connection_refused():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(RewardServerError, match=f"{url} failed after 2 attempt.*refused"):
        call(GenEvalServerReward(url, retries=1, **FAST), [50])


def test_no_retry_on_400():
    fake = FakeGenEvalServer(status=400)
    with fake as url, pytest.raises(RewardServerError, match="1 attempt.*HTTP 400.*cannot parse"):
        call(GenEvalServerReward(url, retries=3, **FAST), [50])
    assert fake.requests == 1


@pytest.mark.parametrize(
    ("malformed", "match"),
    [("garbage", "malformed JSON"), ("missing", "no 'scores'"), ("short", "list of 2 numbers, got 1")],
)
def test_malformed_response(malformed, match):
    fake = FakeGenEvalServer(malformed=malformed)
    with fake as url, pytest.raises(RewardServerError, match=match):
        call(GenEvalServerReward(url, retries=3, **FAST), [50, 60])
    assert fake.requests == 1  # a broken answer is not a transient failure


def test_forbidden_global_in_response_is_refused():
    with FakeGenEvalServer(forbidden_global=True) as url, pytest.raises(RewardServerError) as info:
        call(GenEvalServerReward(url, **FAST), [50])
    assert "refused global collections.OrderedDict" in str(info.value)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_restricted_loads_refuses_globals_and_keeps_builtins():
    value = {"a": [1, 2.5, None, True], "b": (b"jpeg", "text"), "c": {"nested": -10.0}}
    assert restricted_loads(pickle.dumps(value)) == value
    with pytest.raises(pickle.UnpicklingError, match=r"refused global \w+\.system"):
        restricted_loads(pickle.dumps(_RunsCode()))


def test_missing_meta():
    with pytest.raises(ValueError, match="GenEval needs the prompt metadata"):
        GenEvalServerReward("http://127.0.0.1:9")(gray([1]), ["a cat"], None)


def test_url_from_environment(monkeypatch):
    monkeypatch.delenv(URL_ENV, raising=False)
    assert GenEvalServerReward().url == DEFAULT_URL
    with FakeGenEvalServer() as url:
        monkeypatch.setenv(URL_ENV, url)
        reward = GenEvalServerReward(**FAST)
        assert reward.url == url and call(reward, [7]).tolist() == [7.0]


def test_evaluate_per_task_and_overall():
    values = [200, 100, 30, 150]
    tags = ["single_object", "single_object", "counting", "counting"]
    _, meta = metas(4, tags)
    fake = FakeGenEvalServer()
    with fake as url:
        result = GenEvalServerReward(url, batch_size=3, **FAST).evaluate(gray(values), meta)
    assert fake.batch_sizes == [3, 1] and fake.only_strict == [False, False]
    assert result == {
        "single_object": {"strict": 0.5, "standard": 1.0, "partial": 150.0, "n": 2.0},
        "counting": {"strict": 0.5, "standard": 0.5, "partial": 90.0, "n": 2.0},
        "overall": {"strict": 0.5, "standard": 0.75, "partial": 120.0},
    }


def test_the_default_client_waits_as_published_and_outlasts_a_server_restart():
    """Runs of 400+ epochs must not die on one slow batch or a restarting server."""
    client = GenEvalServerReward("http://127.0.0.1:1")
    assert client.timeout == 120.0
    waits = [client.backoff * 2**attempt for attempt in range(client.retries)]
    assert sum(waits) >= 120.0
