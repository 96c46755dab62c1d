"""Just enough of Docker's own parsing to check the Dockerfile and .dockerignore without a Docker engine.

Dockerfile: instructions with their line continuations joined, comments dropped, grouped by stage, global
``ARG`` defaults substituted into ``FROM``. ``.dockerignore``: the rules of moby's patternmatcher (the same
code BuildKit uses): patterns in order, the last one matching a path or any of its parent folders decides,
``!`` lets a path back in, ``*`` and ``?`` stay within one path segment, ``**`` spans any number.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import PurePosixPath

__all__ = ["DockerIgnore", "Instruction", "Stage", "parse_dockerfile"]

_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True)
class Instruction:
    """One instruction: its keyword in capitals, its text after the keyword, and the line it starts on."""

    keyword: str
    text: str
    line: int

    def flags_and_rest(self) -> tuple[dict[str, str], str]:
        """Leading ``--name=value`` flags (as COPY, RUN and HEALTHCHECK take them) and the text after them."""
        flags: dict[str, str] = {}
        rest = self.text
        while match := re.match(r"--([\w-]+)(?:=(\S*))?\s+", rest):
            flags[match.group(1)] = match.group(2) or ""
            rest = rest[match.end() :]
        return flags, rest

    def words(self) -> list[str]:
        """The arguments after any flags: the JSON (exec) form as written, the shell form split like a shell."""
        _, rest = self.flags_and_rest()
        if rest.startswith("["):
            exec_form = json.loads(rest)
            if not isinstance(exec_form, list) or not all(isinstance(each, str) for each in exec_form):
                raise ValueError(f"line {self.line}: not a JSON list of strings: {rest}")
            return exec_form
        return shlex.split(rest)

    def is_exec_form(self) -> bool:
        return self.flags_and_rest()[1].startswith("[")


@dataclass
class Stage:
    """One ``FROM`` and the instructions up to the next; ``base`` has the global ARG defaults filled in."""

    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [each for each in self.instructions if each.keyword == keyword]

    def env(self) -> dict[str, str]:
        """The stage's ENV settings (``KEY=value`` form), later ones winning."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for word in shlex.split(instruction.text):
                key, separator, value = word.partition("=")
                assert separator, f"line {instruction.line}: use ENV KEY=value, not the legacy ENV KEY value"
                values[key] = value
        return values


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Physical lines joined at trailing backslashes; comment lines (also inside a continuation) dropped."""
    lines: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        lines.append((start, " ".join(part for part in pending if part)))
        pending = []
    assert not pending, "the Dockerfile ends inside a line continuation"
    return lines


def parse_dockerfile(text: str) -> list[Stage]:
    """The Dockerfile's stages in order."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, logical in _logical_lines(text):
        keyword, _, rest = logical.partition(" ")
        instruction = Instruction(keyword.upper(), rest.strip(), line)
        if instruction.keyword == "FROM":
            words = instruction.words()
            base = _VARIABLE.sub(lambda m: global_args.get(m.group(1) or m.group(2), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name, line=line))
        elif not stages:
            assert instruction.keyword == "ARG", f"line {line}: only ARG may come before the first FROM"
            key, _, default = instruction.text.partition("=")
            global_args[key.strip()] = default.strip()
        else:
            stages[-1].instructions.append(instruction)
    return stages


@dataclass(frozen=True)
class _Pattern:
    regex: re.Pattern[str]
    exclusion: bool  # a `!` line: matching paths are let back into the context
    text: str


def _compile(pattern: str) -> re.Pattern[str]:
    """moby patternmatcher's translation of a cleaned pattern into an anchored regular expression."""
    out = ""
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**", index):
            index += 2
            if pattern.startswith("/", index):  # `**/` matches zero or more whole folders
                index += 1
                out += "(.*/)?"
            else:
                out += ".*"
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":  # a character class, copied through up to its closing bracket
            end = pattern.index("]", index)
            out += pattern[index : end + 1]
            index = end
        elif char == "\\" and index + 1 < len(pattern):
            index += 1
            out += re.escape(pattern[index])
        else:
            out += re.escape(char)
        index += 1
    return re.compile(f"^{out}$")


class DockerIgnore:
    """A ``.dockerignore``: which paths of the build context are left out of it."""

    def __init__(self, text: str) -> None:
        self.patterns: list[_Pattern] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclusion = line.startswith("!")
            cleaned = str(PurePosixPath(line[1:].strip() if exclusion else line)).lstrip("/")
            self.patterns.append(_Pattern(_compile(cleaned), exclusion, line))

    def excludes(self, path: str) -> bool:
        """True when ``path`` (relative to the context, ``/``-separated) is not sent to the builder."""
        parts = PurePosixPath(path).parts
        candidates = ["/".join(parts[: end + 1]) for end in range(len(parts))]  # parents first, then the path
        excluded = False
        for pattern in self.patterns:
            if pattern.exclusion != excluded:  # only a `!` line can change an excluded path, and vice versa
                continue
            if any(pattern.regex.match(candidate) for candidate in candidates):
                excluded = not pattern.exclusion
        return excluded
