"""Griffe extension for the API page: read the package's docstrings as Google style for Markdown.

The docstrings follow Lightning's conventions, which mix Google sections with a few reStructuredText
forms. Before griffe parses a docstring, this extension rewrites those forms, in the rendered page
only (the source is not touched):

* ``Example:`` (Lightning's singular heading) becomes ``Examples:``, so doctests render as code;
* Sphinx roles (``:class:`~pkg.mod.Name```, ``:func:`name```, ...) become inline code;
* ``.. code-block:: lang`` and a paragraph ending in ``::`` followed by an indented block become
  fenced code blocks;
* an ``Args:`` entry that documents several parameters at once (``a, b, c: ...``) becomes one entry
  per parameter with the same description.

mkdocs.yml loads it with ``extensions: [docs/griffe_docstrings.py]``.
"""

from __future__ import annotations

import re
from typing import Any, List

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$")
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|ref):`(~?)([^`]+)`")
_CODE_BLOCK = re.compile(r"^(\s*)\.\. code-block::\s*(\w*)\s*$")
_LITERAL = re.compile(r"^(\s*)(\S.*?)::\s*$")
_ARGS = re.compile(r"^(\s*)(?:Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")
_MULTI = re.compile(r"^(\s+)(\w+(?:,\s*\w+)+):(.*)$")


def _role(match: re.Match) -> str:
    name = match.group(2)
    if match.group(1):
        name = name.rsplit(".", 1)[-1]
    return f"`{name}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _fence(lines: List[str], start: int, indent: str, lang: str, out: List[str]) -> int:
    """Emit the indented block after ``lines[start]`` as a fenced block; return the next index."""
    i = start + 1
    while i < len(lines) and not lines[i].strip():
        i += 1
    block = []
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(indent)):
        block.append(lines[i])
        i += 1
    while block and not block[-1].strip():
        block.pop()
    if not block:
        return start + 1
    cut = min(_indent(line) for line in block if line.strip())
    out.append("")
    out.append(f"{indent}```{lang}")
    out.extend(f"{indent}{line[cut:]}" if line.strip() else "" for line in block)
    out.append(f"{indent}```")
    out.append("")
    return i


def rewrite(text: str) -> str:
    """The docstring ``text`` with the reStructuredText forms above rewritten for Markdown."""
    lines = text.splitlines()
    out: List[str] = []
    args_indent = -1  # indentation of the current Args: heading, -1 outside one
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() and _indent(line) <= args_indent:
            args_indent = -1
        heading = _ARGS.match(line)
        if heading:
            args_indent = len(heading.group(1))
        multi = _MULTI.match(line) if args_indent >= 0 else None
        if multi:
            j = i + 1
            while j < len(lines) and lines[j].strip() and _indent(lines[j]) > len(multi.group(1)):
                j += 1
            for name in re.split(r",\s*", multi.group(2)):
                out.append(_ROLE.sub(_role, f"{multi.group(1)}{name}:{multi.group(3)}"))
                out.extend(_ROLE.sub(_role, rest) for rest in lines[i + 1 : j])
            i = j
            continue
        code = _CODE_BLOCK.match(line)
        literal = _LITERAL.match(line) if not line.lstrip().startswith((">>>", "...")) else None
        if code:
            i = _fence(lines, i, code.group(1), code.group(2), out)
            continue
        if literal:
            out.append(f"{literal.group(1)}{_ROLE.sub(_role, literal.group(2))}:")
            i = _fence(lines, i, literal.group(1), "", out)
            continue
        line = _EXAMPLE.sub(r"\1Examples:", line)
        out.append(_ROLE.sub(_role, line))
        i += 1
    return "\n".join(out)


class GoogleMarkdownDocstrings(griffe.Extension):
    """Rewrite every docstring with :func:`rewrite` once the object tree is loaded."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
