"""The ``remote`` reward: scores responses with an HTTP reward service (an LLM judge, a verifier farm).

Wire format. The rows are cut into batches of at most ``batch_size``; each batch is one ``POST``
to ``url`` with ``Content-Type: application/json`` (UTF-8) and the ``headers`` option::

    {"prompts": ["...", ...], "responses": ["...", ...], "fields": {"answer": ["...", ...]}}

``fields`` maps each data field named by the ``fields`` option to its values, one per response
(the key is left out when the option names no field). The service answers ``200`` with::

    {"rewards": [1.0, 0.0, ...]}

one number per response, in the order sent (``key`` names the list). Up to ``max_concurrency``
batches are in flight at once; the scores come back in the rows' order whatever order the
batches finish in.

Errors. A 5xx, a 408 or 429, a refused or dropped connection and a timeout are retried up to
``retries`` times, waiting ``backoff * 2**(k - 1)`` seconds before retry ``k``, jittered to
between half and all of that (so that many workers do not retry in lockstep). Any other 4xx is
the request's fault and is not retried. A reply that is not JSON, lacks ``key``, or holds the
wrong number of scores or something other than numbers is an error at once. Every error is a
:class:`RemoteRewardError` naming the URL and the rows; in the PPO stage it stops the run as a
``ComponentError`` naming the reward.

Left out on purpose: ``Retry-After`` is not read (the back-off applies to every retried reply);
each request opens its own connection (no keep-alive pool); ``timeout`` bounds the connect and
each socket read, not a request's total time, so a service that trickles its reply can take longer.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from rlhf_core import hookimpl

#: 4xx statuses that mean "try again later" rather than "this request is wrong".
RETRIED_CLIENT_ERRORS = (408, 429)
#: ``${NAME}`` in a header value is replaced by the environment variable NAME.
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: The reward's own arguments, which a data field cannot be named after.
RESERVED_FIELDS = ("prompts", "responses")


class RemoteRewardError(RuntimeError):
    """The reward service failed for a batch: it stayed down through the retries, refused the
    request (a 4xx), or answered something other than one number per response."""


class _RetryableError(Exception):
    """One attempt failed in a way that a later attempt may not (a 5xx, 408/429, network error)."""


def expand_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """``headers`` with every ``${NAME}`` replaced by the environment variable NAME (so a token
    need not be written in the config); an unset variable is a ``ValueError`` naming it."""
    out = {}
    for name, value in (headers or {}).items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValueError(f"remote reward: headers must map names to strings, got {name!r}: {value!r}")
        missing = [var for var in ENV_REFERENCE.findall(value) if var not in os.environ]
        if missing:
            raise ValueError(f"remote reward: header {name!r} uses ${{{missing[0]}}}, but the environment "
                             f"variable {missing[0]} is not set")
        out[name] = ENV_REFERENCE.sub(lambda m: os.environ[m.group(1)], value)
    return out


def _describe(error: BaseException | str) -> str:
    """``ConnectionRefusedError: [Errno 111] Connection refused`` for an exception, a string as is."""
    return error if isinstance(error, str) else f"{type(error).__name__}: {error}"


class RemoteReward:
    """Scores ``(prompt, response)`` rows with an HTTP reward service (see the module docstring for
    the wire format and the retry rules).

    ``url``: the service's http(s) endpoint (required); ``fields``: data fields of the prompt
    record sent with each row (``[answer]``); ``batch_size``: rows per request; ``timeout``:
    seconds for the connect and each read of one request; ``retries``: attempts after the first;
    ``backoff``: seconds before the first retry, doubled for each next one; ``max_concurrency``:
    requests in flight at once; ``headers``: sent with every request, ``${ENV_VAR}`` expanded;
    ``key``: the reply's key holding the scores. ``retries_used`` counts the retries so far.
    """

    def __init__(self, ctx: Any = None, *, url: str = "", fields: list[str] | None = None, batch_size: int = 32,
                 timeout: float = 30.0, retries: int = 3, backoff: float = 0.5, max_concurrency: int = 4,
                 headers: dict[str, str] | None = None, key: str = "rewards"):
        self.check_options(url=url, fields=fields, batch_size=batch_size, timeout=timeout, retries=retries,
                           backoff=backoff, max_concurrency=max_concurrency, headers=headers, key=key)
        self.url, self.field_names, self.batch_size, self.key = url, tuple(fields or ()), batch_size, key
        self.timeout, self.retries, self.backoff, self.max_concurrency = timeout, retries, backoff, max_concurrency
        self.headers = {"Content-Type": "application/json", **expand_headers(headers)}
        self.retries_used = 0
        self._lock = threading.Lock()
        self._jitter = random.Random()
        self._opener = urllib.request.build_opener()

    @staticmethod
    def fields(*, fields: list[str] | None = None, **_options: Any) -> tuple[str, ...]:
        """The data fields this reward needs, from its options: the ``fields`` option's names."""
        return tuple(fields or ())

    @staticmethod
    def check_options(*, url: str, fields: list[str] | None, batch_size: int, timeout: float,
                      retries: int, backoff: float, max_concurrency: int,
                      headers: dict[str, str] | None, key: str) -> None:
        """Called before anything trains: an http(s) ``url``, distinct field names, positive sizes
        and times, and every ``${ENV_VAR}`` of ``headers`` set."""
        if not url:
            raise ValueError("remote reward: url is required, e.g. url: http://127.0.0.1:8000/score")
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"remote reward: url must be an http:// or https:// URL with a host, got {url!r}")
        if fields is not None:
            if not isinstance(fields, (list, tuple)) or not all(isinstance(f, str) and f for f in fields):
                raise ValueError(f"remote reward: fields must be a list of data field names, got {fields!r}")
            if len(set(fields)) != len(fields):
                raise ValueError(f"remote reward: fields lists a name twice: {list(fields)}")
            if any(f in RESERVED_FIELDS for f in fields):
                raise ValueError(f"remote reward: fields cannot name {' or '.join(RESERVED_FIELDS)} "
                                 f"(always sent), got {list(fields)}")
        for name, value, least in (("batch_size", batch_size, 1), ("retries", retries, 0),
                                   ("max_concurrency", max_concurrency, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"remote reward: {name} must be an integer >= {least}, got {value!r}")
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"remote reward: timeout must be a finite number of seconds > 0, got {timeout!r}")
        if not math.isfinite(backoff) or backoff < 0:
            raise ValueError(f"remote reward: backoff must be a finite number of seconds >= 0, got {backoff!r}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"remote reward: key must be a non-empty string, got {key!r}")
        expand_headers(headers)

    def __call__(self, prompts: list[str], responses: list[str], **fields: list[Any]) -> torch.Tensor:
        """``[B]`` float32 scores from the service, in the order of ``responses``; ``fields`` holds
        one list per declared data field, aligned with ``responses``."""
        n = len(responses)
        if len(prompts) != n:
            raise ValueError(f"remote reward: {len(prompts)} prompts for {n} responses; expected one prompt per response")
        for name in self.field_names:
            if name not in fields:
                raise ValueError(f"remote reward: data field {name!r} was not passed; passed: "
                                 f"{', '.join(sorted(fields)) or '(none)'}")
            if len(fields[name]) != n:
                raise ValueError(f"remote reward: data field {name!r} has {len(fields[name])} values for {n} responses")
        starts = range(0, n, self.batch_size)
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = [pool.submit(self._score_batch, prompts, responses, fields, s) for s in starts]
            try:
                scores = [score for future in futures for score in future.result()]
            except BaseException:
                for future in futures:  # the run stops: send no more batches
                    future.cancel()
                raise
        return torch.tensor(scores, dtype=torch.float32)

    def _score_batch(self, prompts: list[str], responses: list[str], fields: dict[str, list[Any]],
                     start: int) -> list[float]:
        """The scores of rows ``start`` to ``start + batch_size``, retried as the module says."""
        stop = min(start + self.batch_size, len(responses))
        rows = f"rows {start}-{stop - 1}"
        body: dict[str, Any] = {"prompts": prompts[start:stop], "responses": responses[start:stop]}
        if self.field_names:
            body["fields"] = {name: list(fields[name][start:stop]) for name in self.field_names}
        try:
            payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise RemoteRewardError(f"remote reward: {rows} cannot be sent as JSON: {exc}") from exc
        attempts = self.retries + 1
        for attempt in range(attempts):
            if attempt:
                with self._lock:
                    self.retries_used += 1
                delay = self.backoff * 2 ** (attempt - 1)
                time.sleep(delay * (0.5 + 0.5 * self._jitter.random()))
            try:
                reply = self._post(payload, rows)
            except _RetryableError as exc:
                last = str(exc)
                continue
            return self._parse(reply, stop - start, rows)
        raise RemoteRewardError(f"remote reward: {self.url} did not answer after {attempts} attempt"
                                f"{'s' if attempts > 1 else ''} (timeout {self.timeout:g} s) for {rows}: {last}")

    def _post(self, payload: bytes, rows: str) -> bytes:
        """One request; a failure worth retrying is a :class:`_RetryableError`."""
        request = urllib.request.Request(self.url, data=payload, headers=self.headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as reply:
                return reply.read()
        except urllib.error.HTTPError as exc:
            with exc:
                said = exc.read(300).decode("utf-8", "replace")
            status = f"HTTP {exc.code} {exc.reason}"
            if exc.code >= 500 or exc.code in RETRIED_CLIENT_ERRORS:
                raise _RetryableError(status) from exc
            raise RemoteRewardError(f"remote reward: {self.url} answered {status} for {rows}: {said!r}; not retried "
                                    "(only 5xx, 408 and 429 are)") from exc
        except urllib.error.URLError as exc:
            raise _RetryableError(_describe(exc.reason)) from exc
        except (OSError, http.client.HTTPException) as exc:  # a timeout or a dropped connection mid-reply
            raise _RetryableError(_describe(exc)) from exc

    def _parse(self, reply: bytes, n: int, rows: str) -> list[float]:
        """The ``n`` scores under ``key`` in a reply; anything else is a :class:`RemoteRewardError`."""
        expected = f'expected {{"{self.key}": [{n} numbers]}}'
        try:
            data = json.loads(reply)
        except ValueError as exc:
            raise RemoteRewardError(f"remote reward: {self.url} answered {rows} with something that is not JSON "
                                    f"({reply[:200]!r}); {expected}") from exc
        if not isinstance(data, dict) or self.key not in data:
            has = f"keys {sorted(data)}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
            raise RemoteRewardError(f"remote reward: {self.url} answered {rows} without the key {self.key!r} "
                                    f"(it has {has}); {expected}")
        scores = data[self.key]
        if not isinstance(scores, list) or len(scores) != n:
            got = f"{len(scores)} scores" if isinstance(scores, list) else f"a {type(scores).__name__}"
            raise RemoteRewardError(f"remote reward: {self.url} answered {got} for {rows} ({n} responses); {expected}")
        for i, score in enumerate(scores):
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise RemoteRewardError(f"remote reward: {self.url} answered {score!r} as score {i} for {rows}; "
                                        f"{expected}")
        return [float(score) for score in scores]


@hookimpl
def rlhf_register_rewards(register):
    """Register the ``remote`` reward."""
    register("remote", RemoteReward)
