"""Built-in tools a policy may call in multi-turn episodes (``ppo.environment.tools``):
``calculator`` (arithmetic, evaluated without ``eval``) and ``python`` (a program run in the same
sandbox as the ``code`` reward, never in the trainer's process).

A tool is a plain function ``fn(**arguments) -> str`` with type hints and a Google-style docstring,
from which the JSON schema the chat template lists is derived (``transformers.utils.get_json_schema``);
the host parses the policy's calls, runs the function and shows its result as a ``tool`` message
(see :mod:`rlhf_plugins.ppo.episodes`)."""
from __future__ import annotations

import ast
import operator

from rlhf_core import hookimpl
from rlhf_core.sandbox import SandboxLimits, run_tests

#: The operators the calculator evaluates.
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
#: The largest exponent and operand magnitude the calculator accepts (no runaway powers).
MAX_EXPONENT, MAX_MAGNITUDE = 64, 10 ** 30


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        value = _BINARY[type(node.op)](left, right)
        if abs(value) > MAX_MAGNITUDE:
            raise ValueError("the result is too large")
        return value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    raise ValueError("only numbers, + - * / // % ** and parentheses are allowed")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return its value.

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "23+48" or "(2+3)*4"
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}") from None
    value = _evaluate(tree)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def python(code: str) -> str:
    """Run a Python program in a sandbox and return what it printed.

    Args:
        code: the program; its standard output (and the error, if it failed) is the result
    """
    result = run_tests(code, ["pass"], SandboxLimits(timeout=5.0))
    out = result.stdout.strip()
    if result.passed == result.total:
        return out or "(no output)"
    error = "timed out" if result.timed_out else (result.error or result.stderr.strip()[-500:])
    return f"{out}\nerror: {error}".strip()


@hookimpl
def rlhf_register_tools(register):
    register("calculator", calculator)
    register("python", python)
