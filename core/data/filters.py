"""Dataset filters from the config, parsed (never evaluated) into named comparisons on a sample's JSON.

Upstream wrote filters as Python lambdas in YAML (`['width', 'lambda w: w >= 512']`) and ran `eval` on them.
Here the same strings are read with `ast` and only comparisons between the lambda's arguments and literal
numbers or strings, joined by `and`/`or`, are accepted; anything else is an error naming the string.
"""
import ast
import operator
from dataclasses import dataclass

OPERATORS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
             "==": operator.eq, "!=": operator.ne}
_AST_OPERATORS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}
# dict form: {key: aesthetic, op: '>=', threshold: 5}; upstream's configs spell it `thresold`
_THRESHOLD_KEYS = ("threshold", "thresold")


@dataclass(frozen=True)
class Field:
    """A value read from the sample's JSON under `key`."""
    key: str

    def __str__(self):
        return self.key


@dataclass(frozen=True)
class Comparison:
    left: object  # Field or literal
    op: str
    right: object

    def __call__(self, meta: dict) -> bool:
        return OPERATORS[self.op](_value(self.left, meta), _value(self.right, meta))

    def __str__(self):
        return f"{_text(self.left)} {self.op} {_text(self.right)}"


@dataclass(frozen=True)
class Join:
    kind: str  # 'and' | 'or'
    parts: tuple

    def __call__(self, meta: dict) -> bool:
        test = all if self.kind == "and" else any
        return test(part(meta) for part in self.parts)

    def __str__(self):
        return "(" + f" {self.kind} ".join(str(part) for part in self.parts) + ")"


@dataclass(frozen=True)
class SampleFilter:
    """A named keep/drop rule; samples whose JSON lacks a key, or holds an incomparable value, are dropped."""
    name: str
    test: object  # Comparison or Join

    def __call__(self, meta: dict) -> bool:
        try:
            return bool(self.test(meta))
        except (KeyError, TypeError):
            return False


def parse_filters(spec) -> tuple:
    """`dataset_filters` (None, or a list of `[key(s), 'lambda ...']` pairs or threshold dicts) → filters."""
    return tuple(parse_filter(entry) for entry in spec or ())


def parse_filter(entry) -> SampleFilter:
    if isinstance(entry, dict):
        return _threshold_filter(entry)
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str)):
        raise ValueError(f"dataset filter {entry!r}: expected [key, 'lambda x: ...'] or "
                         "{key: ..., op: ..., threshold: ...}")
    keys, text = entry
    keys = [keys] if isinstance(keys, str) else list(keys)
    test = _parse_lambda(text, keys)
    name = str(test)[1:-1] if isinstance(test, Join) else str(test)
    return SampleFilter(name=name, test=test)


def _threshold_filter(entry):
    unknown = set(entry) - {"key", "op", *_THRESHOLD_KEYS}
    given = [k for k in _THRESHOLD_KEYS if k in entry]
    if unknown or "key" not in entry or len(given) != 1:
        raise ValueError(f"dataset filter {entry!r}: expected keys 'key', 'threshold' and optionally 'op'"
                         + (f" (unknown: {sorted(unknown)})" if unknown else ""))
    op = entry.get("op", ">=")
    if op not in OPERATORS:
        raise ValueError(f"dataset filter {entry!r}: op must be one of {list(OPERATORS)}")
    test = Comparison(Field(entry["key"]), op, entry[given[0]])
    return SampleFilter(name=str(test), test=test)


def _parse_lambda(text, keys):
    def fail(reason):
        return ValueError(f"cannot parse dataset filter {text!r}: {reason}")

    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as error:
        raise fail(f"not Python syntax ({error.msg})") from None
    if not isinstance(node, ast.Lambda):
        raise fail("expected 'lambda <args>: <comparisons>'")
    args = node.args
    if args.vararg or args.kwarg or args.kwonlyargs or args.defaults or args.posonlyargs:
        raise fail("only plain positional lambda arguments are allowed")
    names = [a.arg for a in args.args]
    if len(names) != len(keys):
        raise fail(f"the lambda takes {len(names)} argument(s) but {len(keys)} key(s) {keys} are given")
    fields = {name: Field(key) for name, key in zip(names, keys)}

    def operand(n):
        if isinstance(n, ast.Name) and n.id in fields:
            return fields[n.id]
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            value = operand(n.operand)
            if isinstance(value, (int, float)):
                return -value if isinstance(n.op, ast.USub) else value
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float, str)) and not isinstance(n.value, bool):
            return n.value
        raise fail(f"'{ast.unparse(n)}' is neither a lambda argument nor a number or string")

    def condition(n):
        if isinstance(n, ast.BoolOp):
            return Join("and" if isinstance(n.op, ast.And) else "or", tuple(condition(v) for v in n.values))
        if isinstance(n, ast.Compare):
            sides = [operand(n.left)] + [operand(c) for c in n.comparators]
            if any(type(op) not in _AST_OPERATORS for op in n.ops):
                raise fail(f"'{ast.unparse(n)}': only <, <=, >, >=, ==, != are allowed")
            parts = tuple(Comparison(a, _AST_OPERATORS[type(op)], b) for a, op, b in zip(sides, n.ops, sides[1:]))
            return parts[0] if len(parts) == 1 else Join("and", parts)
        raise fail(f"'{ast.unparse(n)}' is not a comparison (only comparisons joined by and/or are allowed)")

    return condition(node.body)


def _value(side, meta):
    return meta[side.key] if isinstance(side, Field) else side


def _text(side):
    return str(side) if isinstance(side, Field) else repr(side)
