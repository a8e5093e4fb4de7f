"""Match PEFT's rank_pattern / alpha_pattern keys against module names in linear time.

The keys are regular expressions from the adapter's author. Python's `re` backtracks, so a key
like `((.)*)*X` takes exponential time, and it holds the GIL while it does: the whole server
freezes, health checks and SIGTERM included. Here a key is parsed by Python's own parser (so
the grammar is exactly Python's) and run as a Thompson NFA (a Pike VM without captures): time
is O(len(name) * program size) whatever the key. Constructs a backtracker needs
(backreferences, lookarounds, conditionals) and flags are refused at load instead.
"""

from __future__ import annotations

import re
import re._constants as C
import re._parser as sre_parse
from collections.abc import Callable
from dataclasses import dataclass

MAX_KEY_CHARS = 256  # real keys are module paths or short regexes like "layers.0.*q_proj"
MAX_PROGRAM = 20_000  # instructions after expanding {m,n}; a bound on time and memory per match


class PatternError(ValueError):
    """A pattern key this runtime will not run; the message says why."""


@dataclass(frozen=True)
class _Char:
    test: Callable[[str], bool]


@dataclass(frozen=True)
class _Split:
    targets: tuple[int, ...]


@dataclass(frozen=True)
class _Jump:
    target: int


@dataclass(frozen=True)
class _Assert:
    at: object  # an AT_* code


_MATCH = "match"

_CATEGORIES: dict[object, Callable[[str], bool]] = {
    C.CATEGORY_DIGIT: str.isdecimal,
    C.CATEGORY_NOT_DIGIT: lambda c: not c.isdecimal(),
    C.CATEGORY_SPACE: str.isspace,
    C.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
    C.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
    C.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_"),
}


class _Compiler:
    def __init__(self) -> None:
        self.prog: list[object] = []

    def emit(self, op: object) -> int:
        if len(self.prog) >= MAX_PROGRAM:
            raise PatternError(f"expands to more than {MAX_PROGRAM} steps (large {{m,n}} counts)")
        self.prog.append(op)
        return len(self.prog) - 1

    def seq(self, items) -> None:
        for op, av in items:
            self.node(op, av)

    def node(self, op, av) -> None:
        if op is C.LITERAL:
            self.emit(_Char(_is(chr(av))))
        elif op is C.NOT_LITERAL:
            is_ch = _is(chr(av))
            self.emit(_Char(lambda c: not is_ch(c)))
        elif op is C.ANY:
            self.emit(_Char(lambda c: c != "\n"))
        elif op is C.IN:
            self.emit(_Char(_char_class(av)))
        elif op is C.AT:
            self.emit(_Assert(av))
        elif op is C.SUBPATTERN:
            _group, add_flags, del_flags, body = av
            if add_flags or del_flags:
                raise PatternError("inline flags such as (?i:...) are not supported")
            self.seq(body)
        elif op is C.BRANCH:
            self.branch(av[1])
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT):
            self.repeat(*av)
        else:
            raise PatternError(f"{str(op).lower()} (backreferences, lookarounds) is not supported")

    def branch(self, alternatives) -> None:
        split = self.emit(_Split(()))
        starts, jumps = [], []
        for alt in alternatives:
            starts.append(len(self.prog))
            self.seq(alt)
            jumps.append(self.emit(_Jump(-1)))
        self.prog[split] = _Split(tuple(starts))
        for j in jumps:
            self.prog[j] = _Jump(len(self.prog))

    def repeat(self, low: int, high: int, body) -> None:
        for _ in range(low):
            self.seq(body)
        if high == C.MAXREPEAT:
            loop = self.emit(_Split(()))
            self.seq(body)
            self.emit(_Jump(loop))
            self.prog[loop] = _Split((loop + 1, len(self.prog)))
            return
        splits = []
        for _ in range(high - low):
            splits.append(self.emit(_Split(())))
            self.seq(body)
        for s in splits:
            self.prog[s] = _Split((s + 1, len(self.prog)))


def _is(ch: str) -> Callable[[str], bool]:
    return lambda c: c == ch


def _between(lo: str, hi: str) -> Callable[[str], bool]:
    return lambda c: lo <= c <= hi


def _char_class(items) -> Callable[[str], bool]:
    negate = False
    tests: list[Callable[[str], bool]] = []
    for op, av in items:
        if op is C.NEGATE:
            negate = True
        elif op is C.LITERAL:
            tests.append(_is(chr(av)))
        elif op is C.RANGE:
            tests.append(_between(chr(av[0]), chr(av[1])))
        elif op is C.CATEGORY and av in _CATEGORIES:
            tests.append(_CATEGORIES[av])
        else:
            raise PatternError(f"character class item {op} is not supported")
    if negate:
        return lambda c: not any(t(c) for t in tests)
    return lambda c: any(t(c) for t in tests)


def _is_word(text: str, i: int) -> bool:
    return 0 <= i < len(text) and (text[i].isalnum() or text[i] == "_")


def _holds(at: object, text: str, i: int) -> bool:
    if at in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
        return i == 0
    if at is C.AT_END:  # Python's $: the end, or before a final newline
        return i == len(text) or (i == len(text) - 1 and text[-1] == "\n")
    if at is C.AT_END_STRING:
        return i == len(text)
    if at is C.AT_BOUNDARY:
        return _is_word(text, i - 1) != _is_word(text, i)
    if at is C.AT_NON_BOUNDARY:
        return _is_word(text, i - 1) == _is_word(text, i)
    raise PatternError(f"anchor {at} is not supported")


class ModulePattern:
    """One rank_pattern/alpha_pattern key, with PEFT's rule: `re.match(r"(.*\\.)?(KEY)$", name)`."""

    def __init__(self, key: str) -> None:
        if not isinstance(key, str) or not key:
            raise PatternError("a pattern key must be a non-empty string")
        if len(key) > MAX_KEY_CHARS:
            raise PatternError(f"is {len(key)} characters long, more than {MAX_KEY_CHARS}")
        source = rf"(.*\.)?({key})$"
        try:
            re.compile(source)  # Python's own verdict on the syntax, without running it
            parsed = sre_parse.parse(source)
        except (re.error, RecursionError, OverflowError) as e:
            raise PatternError(f"is not a valid regular expression: {e}") from e
        if parsed.state.flags & ~(re.UNICODE | re.NOFLAG):
            raise PatternError("global flags such as (?i) are not supported")
        compiler = _Compiler()
        try:
            compiler.seq(parsed)
        except RecursionError as e:
            raise PatternError("is nested too deeply") from e
        compiler.emit(_MATCH)
        self.key = key
        self.prog = compiler.prog

    def matches(self, text: str) -> bool:
        current = self._closure({0}, text, 0)
        for i, ch in enumerate(text):
            nxt = set()
            for pc in current:
                op = self.prog[pc]
                if isinstance(op, _Char) and op.test(ch):
                    nxt.add(pc + 1)
            if not nxt:
                return False
            current = self._closure(nxt, text, i + 1)
        return any(self.prog[pc] is _MATCH for pc in current)

    def _closure(self, starts: set[int], text: str, i: int) -> set[int]:
        """The states reachable from starts without reading a character (each visited once)."""
        seen: set[int] = set()
        out: set[int] = set()
        stack = list(starts)
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            op = self.prog[pc]
            if isinstance(op, _Split):
                stack.extend(op.targets)
            elif isinstance(op, _Jump):
                stack.append(op.target)
            elif isinstance(op, _Assert):
                if _holds(op.at, text, i):
                    stack.append(pc + 1)
            else:
                out.add(pc)
        return out
