"""The ``remote`` reward against real HTTP servers on 127.0.0.1: wire format, order across
concurrent batches, retries (timeout, 5xx, 408/429, refused connection), no retry on other 4xx,
bad replies, bounded concurrency, option checks, and the error the PPO stage sees."""
from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rlhf_core.config import ComponentSpec, check_options
from rlhf_core import CheckedReward, ComponentError, checked_rewards
from rlhf_core.plugin_system.registry import Entry
from rlhf_plugins.rewards import remote
from rlhf_plugins.rewards.remote import RemoteReward, RemoteRewardError

# Small times keep the file fast: a retry waits 0.5x-1x of 10 ms, a timed-out request 0.3 s.
FAST = {"timeout": 0.3, "backoff": 0.01}


def remote_check_options(**options):
    """The host's call: every option, the unset ones at the signature's defaults."""
    return RemoteReward.check_options(**Entry("reward", "remote", RemoteReward, "test").with_defaults(options))


@dataclass
class Reply:
    """What the test server sends back for one request."""

    status: int = 200
    body: bytes = b""
    delay: float = 0.0


@dataclass
class Server:
    """A running test server: its URL and what it saw."""

    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    peak_in_flight: int = 0


def scores(values: list[float]) -> Reply:
    """A well-formed reply carrying ``values``."""
    return Reply(body=json.dumps({"rewards": values}).encode())


@contextmanager
def serve(answer: Callable[[dict[str, Any], int], Reply]) -> Iterator[Server]:
    """Run a threaded HTTP server on a free port; ``answer(request_json, index)`` (index counts
    requests from 0) decides each reply. Counts the most requests handled at once."""
    lock, in_flight = threading.Lock(), [0]
    server_state = Server(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                index = len(server_state.requests)
                server_state.requests.append(body)
                server_state.headers.append(dict(self.headers))
                in_flight[0] += 1
                server_state.peak_in_flight = max(server_state.peak_in_flight, in_flight[0])
            reply = answer(body, index)
            time.sleep(reply.delay)
            with lock:
                in_flight[0] -= 1
            try:
                self.send_response(reply.status)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)
            except OSError:  # the client gave up (timed out) before the reply
                pass

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_state.url = f"http://127.0.0.1:{httpd.server_address[1]}/score"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server_state
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Requests to 127.0.0.1 must not go through a proxy set in the environment."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_scores_keep_their_order_across_concurrent_batches_and_fields_arrive():
    def answer(body, index):
        # score = the response's number, +0.5 where the forwarded answer matches it; the first
        # batch is the slowest, so batches finish out of order
        first = int(body["responses"][0])
        values = [int(r) + (0.5 if a == r else 0.0) for r, a in zip(body["responses"], body["fields"]["answer"])]
        return Reply(body=json.dumps({"rewards": values}).encode(), delay=0.2 if first == 0 else 0.0)

    responses = [str(i) for i in range(10)]
    answers = [r if i % 2 == 0 else "wrong" for i, r in enumerate(responses)]
    prompts = [f"p{i}" for i in range(10)]
    with serve(answer) as server:
        reward = RemoteReward(url=server.url, fields=["answer"], batch_size=3, max_concurrency=4, **FAST)
        out = reward(prompts, responses, answer=answers)
    expected = [i + (0.5 if i % 2 == 0 else 0.0) for i in range(10)]
    assert out.dtype == torch.float32 and out.tolist() == expected
    assert len(server.requests) == 4  # 10 rows in batches of 3
    sent = sorted(server.requests, key=lambda b: int(b["responses"][0]))
    assert [b["prompts"] for b in sent] == [prompts[0:3], prompts[3:6], prompts[6:9], prompts[9:10]]
    assert [b["fields"]["answer"] for b in sent] == [answers[0:3], answers[3:6], answers[6:9], answers[9:10]]
    assert server.peak_in_flight > 1  # the slow first batch overlapped the others
    assert reward.retries_used == 0


def test_without_fields_the_request_has_no_fields_key_and_headers_expand_env(monkeypatch):
    monkeypatch.setenv("RLHF_TEST_REWARD_TOKEN", "s3cret")
    with serve(lambda body, index: scores([float(len(r)) for r in body["responses"]])) as server:
        reward = RemoteReward(url=server.url, headers={"Authorization": "Bearer ${RLHF_TEST_REWARD_TOKEN}"}, **FAST)
        out = reward(["a", "b"], ["xyz", ""])
    assert out.tolist() == [3.0, 0.0]
    assert server.requests == [{"prompts": ["a", "b"], "responses": ["xyz", ""]}]
    assert server.headers[0]["Authorization"] == "Bearer s3cret"
    assert server.headers[0]["Content-Type"] == "application/json"


def test_empty_batch_sends_nothing():
    with serve(lambda body, index: scores([])) as server:
        out = RemoteReward(url=server.url, **FAST)([], [])
    assert out.shape == (0,) and server.requests == []


def test_a_timed_out_request_is_retried():
    # the first request sleeps past the 0.3 s timeout; the retry answers at once
    def answer(body, index):
        return Reply(body=json.dumps({"rewards": [1.0, 2.0]}).encode(), delay=1.0 if index == 0 else 0.0)

    with serve(answer) as server:
        reward = RemoteReward(url=server.url, retries=2, **FAST)
        out = reward(["p", "q"], ["a", "b"])
    assert out.tolist() == [1.0, 2.0]
    assert len(server.requests) == 2 and reward.retries_used == 1


@pytest.mark.parametrize("status", [503, 500, 429, 408])
def test_a_temporary_failure_is_retried(status):
    def answer(body, index):
        return Reply(status=status, body=b"busy") if index < 2 else scores([7.0])

    with serve(answer) as server:
        reward = RemoteReward(url=server.url, retries=3, **FAST)
        out = reward(["p"], ["a"])
    assert out.tolist() == [7.0]
    assert len(server.requests) == 3 and reward.retries_used == 2


def test_a_service_that_stays_failing_names_url_attempts_and_last_error():
    with serve(lambda body, index: Reply(status=502, body=b"bad gateway")) as server:
        reward = RemoteReward(url=server.url, retries=2, **FAST)
        with pytest.raises(RemoteRewardError) as info:
            reward(["p"], ["a"])
    assert len(server.requests) == 3
    assert str(info.value) == (f"remote reward: {server.url} did not answer after 3 attempts (timeout 0.3 s) "
                               "for rows 0-0: HTTP 502 Bad Gateway")


def test_a_service_that_always_times_out_says_so():
    with serve(lambda body, index: Reply(body=b"{}", delay=0.8)) as server:
        reward = RemoteReward(url=server.url, retries=1, **FAST)
        with pytest.raises(RemoteRewardError, match=r"did not answer after 2 attempts \(timeout 0.3 s\).*timed out"):
            reward(["p"], ["a"])


def test_a_down_server_fails_fast_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}/score"
    reward = RemoteReward(url=url, retries=2, **FAST)
    began = time.monotonic()
    with pytest.raises(RemoteRewardError) as info:
        reward(["p", "q"], ["a", "b"])
    assert time.monotonic() - began < 5  # three refused connects and two 10 ms waits, not a hang
    message = str(info.value)
    assert message.startswith(f"remote reward: {url} did not answer after 3 attempts (timeout 0.3 s) for rows 0-1: ")
    assert "ConnectionRefusedError" in message
    assert reward.retries_used == 2


def test_a_client_error_is_not_retried():
    with serve(lambda body, index: Reply(status=400, body=b"missing field 'answer'")) as server:
        reward = RemoteReward(url=server.url, retries=3, **FAST)
        with pytest.raises(RemoteRewardError) as info:
            reward(["p"], ["a"])
    assert len(server.requests) == 1 and reward.retries_used == 0
    assert "answered HTTP 400 Bad Request for rows 0-0" in str(info.value)
    assert "missing field 'answer'" in str(info.value) and "not retried" in str(info.value)


@pytest.mark.parametrize("body, said", [
    (b"<html>oops</html>", "with something that is not JSON (b'<html>oops</html>')"),
    (b'{"scores": [1.0, 2.0]}', "without the key 'rewards' (it has keys ['scores'])"),
    (b"[1.0, 2.0]", "without the key 'rewards' (it has a JSON list)"),
    (b'{"rewards": [1.0]}', "answered 1 scores for rows 0-1 (2 responses)"),
    (b'{"rewards": 1.0}', "answered a float for rows 0-1 (2 responses)"),
    (b'{"rewards": [1.0, "high"]}', "answered 'high' as score 1 for rows 0-1"),
    (b'{"rewards": [true, 1.0]}', "answered True as score 0 for rows 0-1"),
])
def test_a_bad_reply_is_a_clear_error_and_not_retried(body, said):
    with serve(lambda request, index: Reply(body=body)) as server:
        reward = RemoteReward(url=server.url, retries=3, **FAST)
        with pytest.raises(RemoteRewardError) as info:
            reward(["p", "q"], ["a", "b"])
    assert len(server.requests) == 1
    assert f"remote reward: {server.url} " in str(info.value)
    assert said in str(info.value) and 'expected {"rewards": [2 numbers]}' in str(info.value)


def test_key_option_names_the_scores():
    with serve(lambda body, index: Reply(body=b'{"score": [0.25], "why": ["ok"]}')) as server:
        out = RemoteReward(url=server.url, key="score", **FAST)(["p"], ["a"])
    assert out.tolist() == [0.25]


def test_concurrency_is_bounded():
    with serve(lambda body, index: Reply(body=json.dumps({"rewards": [0.0]}).encode(), delay=0.15)) as server:
        reward = RemoteReward(url=server.url, batch_size=1, max_concurrency=3, **FAST)
        reward([str(i) for i in range(9)], [str(i) for i in range(9)])
    assert len(server.requests) == 9
    assert 1 < server.peak_in_flight <= 3


def test_one_request_at_a_time_with_max_concurrency_1():
    with serve(lambda body, index: Reply(body=json.dumps({"rewards": [0.0]}).encode(), delay=0.05)) as server:
        RemoteReward(url=server.url, batch_size=1, max_concurrency=1, **FAST)(["p"] * 4, ["a"] * 4)
    assert len(server.requests) == 4 and server.peak_in_flight == 1


def test_missing_or_misaligned_fields_are_errors_before_any_request():
    with serve(lambda body, index: scores([0.0])) as server:
        reward = RemoteReward(url=server.url, fields=["answer"], **FAST)
        with pytest.raises(ValueError, match=r"data field 'answer' was not passed; passed: tests"):
            reward(["p"], ["a"], tests=["t"])
        with pytest.raises(ValueError, match=r"data field 'answer' has 2 values for 1 responses"):
            reward(["p"], ["a"], answer=["x", "y"])
        with pytest.raises(ValueError, match=r"2 prompts for 1 responses"):
            reward(["p", "q"], ["a"], answer=["x"])
    assert server.requests == []


def test_fields_declared_from_the_options():
    assert RemoteReward.fields(url="http://h/score", fields=["answer", "tests"], batch_size=8) == ("answer", "tests")
    assert RemoteReward.fields(url="http://h/score") == ()


@pytest.mark.parametrize("options, message", [
    ({"url": ""}, "url is required"),
    ({"url": "ftp://host/score"}, "url must be an http:// or https:// URL with a host, got 'ftp://host/score'"),
    ({"url": "localhost:8000"}, "url must be an http:// or https:// URL"),
    ({"url": "http:///score"}, "url must be an http:// or https:// URL"),
    ({"fields": "answer"}, "fields must be a list of data field names, got 'answer'"),
    ({"fields": ["answer", ""]}, "fields must be a list of data field names"),
    ({"fields": ["answer", "answer"]}, "fields lists a name twice"),
    ({"fields": ["responses"]}, "fields cannot name prompts or responses"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"retries": -1}, "retries must be an integer >= 0, got -1"),
    ({"max_concurrency": 0}, "max_concurrency must be an integer >= 1, got 0"),
    ({"timeout": 0}, "timeout must be a finite number of seconds > 0, got 0"),
    ({"timeout": float("inf")}, "timeout must be a finite number of seconds > 0"),
    ({"backoff": -0.5}, "backoff must be a finite number of seconds >= 0, got -0.5"),
    ({"key": ""}, "key must be a non-empty string"),
    ({"headers": {"X-Retries": 3}}, "headers must map names to strings"),
    ({"headers": {"Authorization": "Bearer ${RLHF_TEST_UNSET_VAR}"}},
     "header 'Authorization' uses ${RLHF_TEST_UNSET_VAR}, but the environment variable RLHF_TEST_UNSET_VAR is not set"),
])
def test_bad_options_are_rejected_before_training(options, message, monkeypatch):
    monkeypatch.delenv("RLHF_TEST_UNSET_VAR", raising=False)
    options = {"url": "http://127.0.0.1:8000/score", **options}
    with pytest.raises(ValueError) as info:
        remote_check_options(**options)
    assert message in str(info.value) and str(info.value).startswith("remote reward: ")
    with pytest.raises(ValueError):  # the constructor runs the same checks
        RemoteReward(**options)


def test_good_options_pass():
    remote_check_options(url="https://judge.example/score", fields=["answer"], batch_size=1, timeout=0.5,
                               retries=0, backoff=0, max_concurrency=1, headers={"X-Team": "rl"}, key="score")


def test_the_config_check_reports_options_with_their_path():
    entry = Entry("reward", "remote", RemoteReward, "rewards-remote")
    problems: list[str] = []
    check_options(entry, ComponentSpec("remote", {"url": "http://h/score", "retry": 2}), "stages[2].reward", problems)
    check_options(entry, ComponentSpec("remote", {"fields": ["answer"]}), "stages[2].reward", problems)
    good = ComponentSpec("remote", {"url": "http://h/score", "timeout": 2, "fields": ["answer"]})
    check_options(entry, good, "stages[2].reward", problems)
    assert problems == [
        "stages[2].reward.retry: unknown option for reward 'remote'; accepted: backoff, batch_size, fields, "
        "headers, key, max_concurrency, retries, timeout, url",
        "stages[2].reward: remote reward: url is required, e.g. url: http://127.0.0.1:8000/score",
    ]
    assert good.options["timeout"] == 2.0 and isinstance(good.options["timeout"], float)


def test_registered_as_remote():
    registered = {}
    remote.rlhf_register_rewards(lambda name, cls: registered.__setitem__(name, cls))
    assert registered == {"remote": RemoteReward}


def test_the_stage_sees_a_component_error_naming_the_reward_and_the_url():
    url = f"http://127.0.0.1:{free_port()}/score"
    entry = SimpleNamespace(kind="reward", name="remote", plugin="rewards-remote")
    reward = RemoteReward(url=url, retries=0, **FAST)
    with pytest.raises(ComponentError) as info:
        checked_rewards(entry, reward, ["p"], ["a"])
    message = str(info.value)
    assert message.startswith("reward 'remote' (plugin 'rewards-remote') raised RemoteRewardError: remote reward: ")
    assert url in message and "did not answer after 1 attempt (timeout 0.3 s)" in message


def test_the_host_passes_the_declared_fields_from_the_data_rows():
    def answer(body, index):
        return scores([1.0 if r == a else 0.0 for r, a in zip(body["responses"], body["fields"]["answer"])])

    entry = Entry("reward", "remote", RemoteReward, "rewards-remote")
    rows = [{"prompt": "1+1=", "answer": "2", "source": "gsm"}, {"prompt": "2+2=", "answer": "4", "source": "gsm"}]
    with serve(answer) as server:
        reward = CheckedReward(entry, None, {"url": server.url, "fields": ["answer"], **FAST})
        out = reward(["1+1=", "2+2="], ["2", "5"], rows)
    assert reward.fields == ("answer",)
    assert out.tolist() == [1.0, 0.0]
    assert server.requests[0]["fields"] == {"answer": ["2", "4"]}  # only the declared field is sent
