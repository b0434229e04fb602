"""The ``--where`` language: a selection of training galaxies by their properties.

    r50_px >= 6 and ellipticity > 0.5
    (colour > 0.3 or concentration >= 3) and 2 < r50_px < 8

A condition compares a property name with a number (``<``, ``<=``, ``>``, ``>=``, ``==``,
``!=``; chained as in ``2 < r50_px < 8``); conditions join with ``and`` / ``or`` (``and``
binds tighter) and group with parentheses. Nothing else is accepted: no calls, attributes,
indexing, arithmetic, strings, ``not`` or names other than the properties. A galaxy whose
property could not be measured (NaN) satisfies no condition on that property.

Why Python's ``ast`` and not a parser of our own: the language is a subset of Python's
expression syntax, so :func:`ast.parse` gives precedence, parentheses and chained comparisons
as Python users expect them. Parsing only builds a tree (it runs nothing); the tree is then
checked node by node against a whitelist and interpreted here with numpy, never compiled or
passed to ``eval``. Input is capped at :data:`MAX_WHERE_CHARS` before parsing, which also
bounds the nesting the checker recurses through.
"""

from __future__ import annotations

import ast
import math
import operator
from functools import lru_cache
from typing import Callable, Mapping, Sequence

import numpy as np

MAX_WHERE_CHARS = 500
COMPARISONS: dict[type, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}
EXAMPLE = "r50_px >= 6 and ellipticity > 0.5"
# What a rejected node is, in words, for the error message.
_WHAT = {
    ast.Call: "a function call", ast.Attribute: "an attribute", ast.Subscript: "indexing",
    ast.Lambda: "a lambda", ast.IfExp: "a conditional expression", ast.BinOp: "arithmetic",
    ast.NamedExpr: "an assignment", ast.Starred: "unpacking", ast.Await: "await",
    ast.ListComp: "a comprehension", ast.SetComp: "a comprehension", ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a comprehension", ast.List: "a list", ast.Tuple: "a tuple", ast.Set: "a set",
    ast.Dict: "a dict", ast.JoinedStr: "a string", ast.FormattedValue: "a string",
}
_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
              ast.Pow: "**", ast.LShift: "<<", ast.RShift: ">>", ast.BitOr: "|", ast.BitAnd: "&",
              ast.BitXor: "^", ast.MatMult: "@"}


class WhereError(ValueError):
    """A ``--where`` selection that cannot be used; the message says what to change."""


Tree = tuple  # ("and"|"or", [trees]) or ("cmp", [names or floats], [ops])


def _short(text: str, limit: int = 60) -> str:
    return text[:limit] + "..." if len(text) > limit else text


def _fail(text: str, problem: str, names: Sequence[str]) -> WhereError:
    return WhereError(f"where {_short(text)!r}: {problem}; write comparisons of properties with numbers joined "
                      f"by and/or, e.g. {EXAMPLE!r}; known properties: {', '.join(names)}")


def _describe(node: ast.AST) -> str:
    """``source (what it is)`` of a rejected node, short."""
    if isinstance(node, ast.BinOp):
        what = f"the operator {_OPERATORS.get(type(node.op), type(node.op).__name__)}"
    elif isinstance(node, ast.UnaryOp):
        what = "not" if isinstance(node.op, ast.Not) else "arithmetic"
    else:
        what = _WHAT.get(type(node), type(node).__name__)
    return f"{_short(ast.unparse(node), 40)} ({what})"


def _operand(node: ast.expr, text: str, names: Sequence[str]) -> str | float:
    """A property name or a finite number (a sign allowed)."""
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise _fail(text, f"unknown property {node.id!r}", names)
        return node.id
    number, sign = node, 1.0
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        number, sign = node.operand, (-1.0 if isinstance(node.op, ast.USub) else 1.0)
    if isinstance(number, ast.Constant) and type(number.value) in (int, float):  # not bool, str, complex
        try:
            value = sign * float(number.value)
        except OverflowError:  # an integer literal past float's range
            value = math.inf
        if not math.isfinite(value):
            raise _fail(text, f"{_short(ast.get_source_segment(text.strip(), node) or '', 40)} is not a finite number",
                        names)
        return value
    if isinstance(number, ast.Constant):
        raise _fail(text, f"{_short(ast.unparse(number), 40)} is not a number", names)
    raise _fail(text, f"{_describe(node)} is not allowed", names)


def _check(node: ast.expr, text: str, names: Sequence[str]) -> Tree:
    """The whitelisted tree of ``node``: BoolOp(and/or) of Compare(name/number ...)."""
    if isinstance(node, ast.BoolOp):
        return ("and" if isinstance(node.op, ast.And) else "or", [_check(v, text, names) for v in node.values])
    if isinstance(node, ast.Compare):
        bad = [op for op in node.ops if type(op) not in COMPARISONS]
        if bad:
            raise _fail(text, f"{_short(ast.unparse(node), 40)} uses a comparison other than <, <=, >, >=, ==, !=",
                        names)
        operands = [_operand(v, text, names) for v in (node.left, *node.comparators)]
        if not any(isinstance(v, str) for v in operands) or not any(isinstance(v, float) for v in operands):
            raise _fail(text, f"{_short(ast.unparse(node), 40)} does not compare a property with a number", names)
        return ("cmp", operands, [COMPARISONS[type(op)] for op in node.ops])
    if isinstance(node, (ast.Name, ast.Constant)):
        raise _fail(text, f"{_short(ast.unparse(node), 40)} alone is not a condition", names)
    raise _fail(text, f"{_describe(node)} is not allowed", names)


@lru_cache(maxsize=256)
def parse_where(text: str, names: tuple[str, ...]) -> Tree:
    """The checked tree of a selection over the property ``names``; :class:`WhereError` (one line,
    naming what is wrong and listing ``names``) for anything outside the language."""
    if not isinstance(text, str):
        raise WhereError(f"where must be a string like {EXAMPLE!r}, got {type(text).__name__}")
    if len(text) > MAX_WHERE_CHARS:
        raise _fail(text, f"{len(text)} characters, more than the {MAX_WHERE_CHARS} allowed", names)
    if not text.strip():
        raise _fail(text, "it is empty", names)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:  # ValueError: a NUL byte
        raise _fail(text, f"not an expression ({getattr(e, 'msg', None) or e})", names) from None
    try:
        return _check(tree.body, text, names)
    except RecursionError:
        raise _fail(text, "nested too deeply", names) from None


def _evaluate(tree: Tree, columns: Mapping[str, np.ndarray]) -> np.ndarray:
    kind, parts = tree[0], tree[1]
    if kind == "cmp":
        values = [columns[v] if isinstance(v, str) else v for v in parts]
        # NaN (not measured) satisfies nothing, also not !=
        out = np.logical_and.reduce([np.isfinite(columns[v]) for v in parts if isinstance(v, str)])
        for a, op, b in zip(values, tree[2], values[1:]):
            out = out & op(a, b)
        return out
    combine = np.logical_and if kind == "and" else np.logical_or
    return combine.reduce([_evaluate(t, columns) for t in parts])


def where_mask(text: str, columns: Mapping[str, np.ndarray]) -> np.ndarray:
    """(N,) bool: which rows of ``columns`` ({property: (N,) floats}) satisfy ``text``."""
    tree = parse_where(text, tuple(columns))
    n = len(next(iter(columns.values())))
    return np.asarray(_evaluate(tree, columns), bool) & np.ones(n, bool)
