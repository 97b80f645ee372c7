"""Multi-turn episodes (``ppo.environment``): token-in, token-out.

An episode is one token sequence: the opening (the environment's first messages rendered with the
chat template, as a prompt), then the policy's tokens **exactly as the generator sampled them**,
and between its turns the environment's (or the tools') messages rendered through the chat
template and appended as tokens. The policy's tokens are never decoded and encoded again; the
decoded text of a turn only goes to the environment, the tools and the rewards. The episode
becomes a :class:`~rlhf_core.Rollout` row whose response ``mask`` is 1 on the policy's tokens only
(``labels`` -100 elsewhere), so every log-prob, KL and loss term PPO computes is of exactly the
tokens the policy produced; the environment's tokens are context, attended to but never trained on.

Episodes of a batch step together: each turn, one ``generate`` call samples a reply for every
episode still running (a process whose episodes all ended still takes part while any other
process's run, so sharded models step in lockstep), then the environment steps (and tool calls)
of the different episodes run at once on :class:`StepPool`'s threads, each within
``environment.step_timeout`` (``tool_timeout`` for a tool).
"""
from __future__ import annotations

import json
import queue
import threading
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rlhf_core import (
    IGNORE_INDEX, CheckedEnvironment, ComponentError, Observation, Rollout, StageError, apply_template, describe,
    fit_prompt, masked_mean, role_lines,
)
from rlhf_core import distributed as dist_utils

#: The content of the probe conversation's assistant message (see :class:`EpisodeRendering`).
_MARK = "\u2063rlhf-assistant\u2063"

#: How each way an episode can end is logged (``episode_<name>``, the share of the batch's episodes).
ENDINGS = {"done": "episode_done", "max_turns": "episode_cut_turns", "max_tokens": "episode_cut_tokens",
           "context": "episode_cut_context", "turn_tokens": "episode_cut_turn"}


class EpisodeRendering:
    """How an episode's messages become text for the tokenizer: with the chat template (and the
    tools' schemas) when ``use_template``, else the ``role: content`` lines of the fallback.

    :meth:`opening` renders the first messages as a prompt (generation prompt included);
    :meth:`after_reply` renders the messages that follow an assistant reply which ended with EOS:
    what the template closes an assistant turn with (less the EOS text the policy already
    sampled), the new messages, and the next generation prompt. It is measured once on a probe
    conversation, the difference between the template with and without the new messages, so no
    assistant text of the episode is ever rendered again. A template that renders earlier turns
    differently once more are added cannot be used (an error naming ``where``)."""

    def __init__(self, tokenizer: Any, use_template: bool, tools: list[dict] | None, where: str):
        self.tokenizer, self.use_template, self.tools, self.where = tokenizer, use_template, tools or None, where
        self.eos_text = getattr(tokenizer, "eos_token", None) or ""
        self.closing = "" if self.eos_text else "\n"  # role_lines: an assistant message ends with EOS
        if use_template:
            self.probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARK}]
            self.before = apply_template(tokenizer, self.probe, where, False, self.tools)
            if _MARK not in self.before:
                raise StageError(f"{where}: the chat template drops the assistant's content; multi-turn episodes need "
                                 "a template that renders assistant messages (or data.chat_template: never)")
            self.closing = self.before[self.before.rindex(_MARK) + len(_MARK):]

    def opening(self, messages: list[dict]) -> str:
        """The episode's first messages as prompt text."""
        if self.use_template:
            return apply_template(self.tokenizer, messages, self.where, True, self.tools)
        return role_lines(messages, self.eos_text)

    def after_reply(self, messages: list[dict]) -> str:
        """The text between a reply's EOS and the next reply: the turn's closing and ``messages``."""
        closing = self.closing
        if self.eos_text and closing.startswith(self.eos_text):
            closing = closing[len(self.eos_text):]
        if not self.use_template:
            return closing + role_lines(messages, self.eos_text)
        after = apply_template(self.tokenizer, self.probe + messages, self.where, True, self.tools)
        if not after.startswith(self.before):
            raise StageError(f"{self.where}: the chat template renders earlier turns differently once more messages "
                             "follow, so an episode cannot grow by appending tokens; use a template that leaves "
                             "earlier turns as they are, or data.chat_template: never")
        return closing + after[len(self.before):]


class ToolBox:
    """The tools an episode's policy may call: their JSON schemas for the chat template, the parser
    of calls (``open`` JSON ``close``, the JSON ``{"name": ..., "arguments": {...}}``; ``arguments``
    may also be a JSON string of that object) and the calls themselves, each in its own thread within
    ``timeout`` seconds. Whatever goes wrong (a call that does not parse, an unknown tool, bad
    arguments, a tool that raises or runs out of time) becomes the tool message ``error: ...`` the
    policy reads, never an exception."""

    def __init__(self, entries: list[Any], tags: tuple[str, str] | list[str], timeout: float):
        self.functions = {e.name: e.obj for e in entries}
        self.schemas = [tool_schema(e) for e in entries]
        self.open, self.close = tags
        self.timeout = timeout

    def respond(self, reply: str) -> tuple[list[dict], int, int] | None:
        """``(tool messages, calls, errors)`` for the calls in ``reply`` (each opening tag starts one),
        or None when it calls none."""
        if self.open not in reply:
            return None
        parts = reply.split(self.open)[1:]
        messages, errors = [], 0
        for part in parts:
            name, content = self._call(part)
            errors += content.startswith("error: ")
            messages.append({"role": "tool", "name": name, "content": content})
        return messages, len(parts), errors

    def _call(self, part: str) -> tuple[str, str]:
        """``(tool name or "unknown", result text)`` of one call's text after its opening tag."""
        if self.close not in part:
            return "unknown", f"error: the call has no closing {self.close}"
        payload = part[:part.index(self.close)].strip()
        try:
            call = json.loads(payload)
        except json.JSONDecodeError as exc:
            return "unknown", f"error: the call is not valid JSON ({exc.msg} at character {exc.pos})"
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return "unknown", 'error: a call is a JSON object {"name": ..., "arguments": {...}}'
        name, arguments = call["name"], call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if name not in self.functions:
            return name, f"error: no tool named {name!r}; available: {', '.join(sorted(self.functions))}"
        if not isinstance(arguments, dict):
            return name, "error: arguments must be a JSON object"
        return name, self._run(name, arguments)

    def _run(self, name: str, arguments: dict) -> str:
        box: dict[str, Any] = {}

        def target():
            try:
                box["out"] = str(self.functions[name](**arguments))
            except Exception as exc:  # the policy reads what went wrong
                box["out"] = f"error: {type(exc).__name__}: {exc}"

        thread = threading.Thread(target=target, name=f"rlhf-tool-{name}", daemon=True)
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():  # left running (a daemon thread never holds the process open)
            return f"error: {name} did not finish within {self.timeout:g} s"
        return box["out"]


def tool_schema(entry: Any) -> dict:
    """The registered tool's JSON schema (``{"type": "function", "function": {...}}``): the one it was
    registered with, else derived from its type hints and Google-style docstring by transformers'
    ``get_json_schema``; the function name is the registered name."""
    schema = entry.meta.get("schema")
    if schema is None:
        from transformers.utils import get_json_schema

        try:
            schema = get_json_schema(entry.obj)
        except Exception as exc:
            raise ComponentError(f"{describe(entry)}: no JSON schema could be derived from the function ({exc}); give "
                                 "it type hints and a Google-style docstring with an Args section, or register it "
                                 "with schema={...}") from None
    schema = json.loads(json.dumps(schema))  # a copy the host may change
    schema.setdefault("function", {})["name"] = entry.name
    return schema


class StepPool:
    """Daemon threads that run environment steps of different episodes at once. A call that never
    returns holds its thread but not the process: the run ends with the timeout's error."""

    def __init__(self, workers: int):
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._work, name=f"rlhf-env-{i}", daemon=True) for i in range(workers)]
        for thread in self.threads:
            thread.start()

    def _work(self) -> None:
        while True:
            fn, item, future = self.tasks.get()
            try:
                future.set_result(fn(item))
            except BaseException as exc:  # handed to the waiting caller
                future.set_exception(exc)

    def map(self, fn: Callable[[Any], Any], items: list[Any], timeout: float, on_timeout: Callable[[], Exception]) -> list:
        """``[fn(item) for item in items]`` run on the threads; what ``fn`` raises is raised here; a call
        not done ``timeout`` seconds after the one before it raises ``on_timeout()``."""
        futures = []
        for item in items:
            future: Future = Future()
            self.tasks.put((fn, item, future))
            futures.append(future)
        out = []
        for future in futures:
            try:
                out.append(future.result(timeout=timeout))
            except FutureTimeout:
                raise on_timeout() from None
        return out


@dataclass
class Episode:
    """One episode as it runs: its data ``row`` and ``seed``, the conversation ``messages``, the
    opening's ids, the ``body`` tokens after it with ``policy`` flags (True: sampled by the policy)
    and the engine's log-prob of each (0 off the policy's), the summed ``reward``, the ``turns``
    taken, why it ended (a key of :data:`ENDINGS`, "" while it runs) and the last reply's text."""

    row: dict[str, Any]
    seed: int
    messages: list[dict] = field(default_factory=list)
    state: Any = None
    text: str = ""
    opening: list[int] = field(default_factory=list)
    body: list[int] = field(default_factory=list)
    policy: list[bool] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)
    reward: float = 0.0
    turns: int = 0
    ended: str = ""
    final: str = ""
    budget: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    info: dict[str, float] = field(default_factory=dict)

    def add(self, obs: Observation) -> None:
        """Count an observation's reward and info."""
        self.reward += float(obs.reward)
        for key, value in obs.info.items():
            self.info[key] = self.info.get(key, 0.0) + float(value)

    def append(self, tokens: list[int], by_policy: bool, logprobs: list[float] | None = None) -> None:
        self.body += tokens
        self.policy += [by_policy] * len(tokens)
        self.engine += logprobs if logprobs is not None else [0.0] * len(tokens)


@dataclass
class EpisodeBatch:
    """A batch of finished episodes: the :class:`~rlhf_core.Rollout` (``responses``: each episode's
    last reply), the environment's summed ``rewards [B]``, ``truncated [B]`` (ended other than by
    the environment's ``done``), the opening ``texts`` (what the rewards read as the prompt), the
    batch statistics (means over every process's episodes) and the episodes themselves."""

    rollout: Rollout
    rewards: torch.Tensor
    truncated: torch.Tensor
    texts: list[str]
    stats: dict[str, float]
    episodes: list[Episode]


class EpisodeRunner:
    """Runs batches of episodes of one environment with one generator (see the module docstring).

    ``prompt_budget``: most tokens of an opening (a longer one keeps its last tokens);
    ``max_length``: ``data.max_length``, the default bound of opening + body; ``context``: the
    model's context length (None: unbounded)."""

    def __init__(self, spec: Any, environment: CheckedEnvironment, tools: ToolBox | None, rendering: EpisodeRendering,
                 tokenizer: Any, generator: Any, generation: Any, *, prompt_budget: int, max_length: int,
                 context: int | None, device: torch.device):
        self.spec, self.environment, self.tools, self.rendering = spec, environment, tools, rendering
        self.tokenizer, self.generator, self.generation = tokenizer, generator, generation
        self.prompt_budget, self.max_length, self.context, self.device = prompt_budget, max_length, context, device
        self.pool = StepPool(spec.workers)

    # ------------------------------------------------------------------ one batch

    def run(self, rows: list[dict[str, Any]], seeds: list[int]) -> EpisodeBatch:
        """Run one episode per ``(row, seed)`` to its end; every process calls it together."""
        episodes = [Episode(dict(row), seed) for row, seed in zip(rows, seeds)]
        for e, obs in zip(episodes, self._map("reset", lambda e: self.environment.reset(e.row, e.seed), episodes)):
            self._open(e, obs)
        self.reported = True  # the generator gave its log-probs on every turn
        for _ in range(self.spec.max_turns):
            running = [e for e in episodes if not e.ended]
            if float(dist_utils.all_reduce_max(torch.tensor(float(len(running)), device=self.device))) == 0:
                break
            self._reply(running, episodes)
            answering = [e for e in running if not e.ended]
            for e, obs in zip(answering, self._map("step", self._respond, answering)):
                self._continue(e, obs)
        for e in episodes:
            e.ended = e.ended or "max_turns"
        return self._batch(episodes)

    def _open(self, e: Episode, obs: Observation) -> None:
        e.state, e.messages = obs.state, list(obs.messages)
        e.add(obs)
        e.text = self.rendering.opening(e.messages)
        e.opening, _ = fit_prompt(self.tokenizer, e.text, self.prompt_budget)
        e.budget = self.spec.max_tokens or self.max_length - len(e.opening)
        if self.context is not None:
            e.budget = min(e.budget, self.context - len(e.opening))
        if e.budget < 1:
            raise StageError(f"environment {self.spec.name!r}: an opening of {len(e.opening)} tokens leaves no room for "
                             f"a reply (data.max_length {self.max_length}, the model's context {self.context}); raise "
                             "data.max_length or lower data.max_prompt_length")

    def _reply(self, running: list[Episode], episodes: list[Episode]) -> None:
        """One generate call for every running episode (a stand-in row where this process has none)."""
        eos = self.tokenizer.eos_token_id
        room = max((e.budget - len(e.body) for e in running), default=1)
        new = int(dist_utils.all_reduce_max(torch.tensor(float(min(self.generation.max_new_tokens, room)),
                                                         device=self.device)))
        contexts = [e.opening + e.body for e in running] or [episodes[0].opening if episodes else [eos]]
        roll = self.generator.generate(contexts, max_new_tokens=new, temperature=self.generation.temperature,
                                       top_p=self.generation.top_p)
        self.reported &= roll.logprobs is not None
        for i, e in enumerate(running):
            keep = roll.mask[i].bool()
            tokens = roll.labels[i][keep].tolist()  # the sampled ids up to and including EOS, as sampled
            logprobs = roll.logprobs[i][keep].tolist() if roll.logprobs is not None else None
            room = e.budget - len(e.body)
            if len(tokens) > room:
                tokens, logprobs = tokens[:room], logprobs[:room] if logprobs is not None else None
                e.ended = "max_tokens"
            e.append(tokens, True, logprobs)
            e.turns += 1
            e.final = self.tokenizer.decode(tokens, skip_special_tokens=True)
            e.messages.append({"role": "assistant", "content": e.final})
            if not e.ended and (not tokens or tokens[-1] != eos):
                e.ended = "turn_tokens"  # the turn ran out of generation.max_new_tokens before EOS

    def _respond(self, e: Episode) -> Observation:
        """The tools' results when the reply calls any, else the environment's step (on a pool thread)."""
        if self.tools is not None:
            called = self.tools.respond(e.final)
            if called is not None:
                messages, calls, errors = called
                e.tool_calls += calls
                e.tool_errors += errors
                return Observation(messages, state=e.state)
        return self.environment.step(e.state, e.final)

    def _continue(self, e: Episode, obs: Observation) -> None:
        e.state = obs.state
        e.add(obs)
        if obs.done:
            e.ended = "done"
            return
        if e.turns >= self.spec.max_turns:
            e.ended = "max_turns"
            return
        e.messages += obs.messages
        ids = list(self.tokenizer(self.rendering.after_reply(obs.messages), add_special_tokens=False)["input_ids"])
        if len(e.body) + len(ids) + 1 > e.budget:  # no room for the observation and a reply token
            overflow_context = self.context is not None and len(e.opening) + len(e.body) + len(ids) + 1 > self.context
            e.ended = "context" if overflow_context and e.budget == self.context - len(e.opening) else "max_tokens"
            return
        e.append(ids, False)

    def _map(self, method: str, fn: Callable[[Episode], Observation], episodes: list[Episode]) -> list[Observation]:
        timeout = self.spec.step_timeout

        def late() -> Exception:
            return ComponentError(f"{describe(self.environment.entry)}: {method} did not return within "
                                  f"environment.step_timeout ({timeout:g} s); the run stops (raise step_timeout if "
                                  "the environment is slow rather than stuck)")

        return self.pool.map(fn, episodes, timeout, late)

    # ------------------------------------------------------------------ the rollout

    def _batch(self, episodes: list[Episode]) -> EpisodeBatch:
        tok = self.tokenizer
        n = len(episodes)
        width = max([len(e.opening) for e in episodes] + [1])
        span = max([len(e.body) for e in episodes] + [1])
        sequences = torch.full((n, width + span), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros(n, width + span, dtype=torch.long)
        labels = torch.full((n, span), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(n, span, dtype=torch.long)
        engine = torch.zeros(n, span)
        for b, e in enumerate(episodes):
            left = width - len(e.opening)
            sequences[b, left:width] = torch.tensor(e.opening, dtype=torch.long)
            attention[b, left:width + len(e.body)] = 1
            if e.body:
                body = torch.tensor(e.body, dtype=torch.long)
                policy = torch.tensor(e.policy, dtype=torch.bool)
                sequences[b, width:width + len(e.body)] = body
                labels[b, :len(e.body)] = body.masked_fill(~policy, IGNORE_INDEX)
                mask[b, :len(e.body)] = policy.long()
                engine[b, :len(e.body)] = torch.tensor(e.engine) * policy
        rollout = Rollout(sequences.to(self.device), attention.to(self.device), width, labels.to(self.device),
                          mask.to(self.device), [e.final for e in episodes],
                          engine.to(self.device) if self.reported else None)
        rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float32, device=self.device)
        truncated = torch.tensor([e.ended != "done" for e in episodes], dtype=torch.bool, device=self.device)
        return EpisodeBatch(rollout, rewards, truncated, [e.text for e in episodes], self.stats(episodes), episodes)

    def columns(self, episodes: list[Episode]) -> dict[str, list[float]]:
        """Per episode: turns, tokens after the opening, whether it ended each way (:data:`ENDINGS`),
        the environment's reward, tool calls and errors (with tools), and each ``info`` key any
        process's episodes reported as ``env_<key>`` (every process calls this together)."""
        keys = sorted({k for ks in dist_utils.all_gather_objects(sorted({k for e in episodes for k in e.info}))
                       for k in ks})
        columns = {"episode_turns": [float(e.turns) for e in episodes],
                   "episode_tokens": [float(len(e.body)) for e in episodes],
                   **{name: [float(e.ended == end) for e in episodes] for end, name in ENDINGS.items()},
                   "env_reward": [e.reward for e in episodes]}
        if self.tools is not None:
            columns["tool_calls"] = [float(e.tool_calls) for e in episodes]
            columns["tool_errors"] = [float(e.tool_errors) for e in episodes]
        columns.update({f"env_{k}": [e.info.get(k, 0.0) for e in episodes] for k in keys})
        return columns

    def stats(self, episodes: list[Episode]) -> dict[str, float]:
        """The means of :meth:`columns` over every process's episodes."""
        ones = torch.ones(len(episodes), dtype=torch.float64, device=self.device)
        return {name: float(masked_mean(torch.tensor(values, dtype=torch.float64, device=self.device), ones,
                                        global_=True)) for name, values in self.columns(episodes).items()}
