"""A Griffe extension: the reST bits of our Google-style docstrings, as Markdown.

The docstrings follow optax (Google sections, math in ``.. math::`` blocks, Sphinx roles)
so that they read well in ``help()`` and in an IDE. mkdocstrings renders docstring text as
Markdown, so before it does, this rewrites

* ``.. math::`` + an indented block  ->  a ``$$ ... $$`` block (pymdownx.arithmatex),
* ``:math:`x```                      ->  ``$x$``,
* ``:func:`f```, ``:class:`C``` ...   ->  a link for the package's public names, code otherwise,
* a paragraph ending in ``::``        ->  ``:`` (its indented block is already a code block).

Only the text the docs show changes; the source is untouched.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

PACKAGE = "jax_orthopenalty"

_ROLE = re.compile(r":(?:func|class|meth|attr|mod|obj|data|exc):`~?([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")


def _public_names() -> set[str]:
    import jax_orthopenalty

    return set(jax_orthopenalty.__all__)


def _link(match: re.Match[str], public: set[str]) -> str:
    target = match.group(1).strip()
    short = target.removeprefix(f"{PACKAGE}.")
    if short in public:
        return f"[`{short}`][{PACKAGE}.{short}]"
    return f"`{target}`"


def _math_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == ".. math::":
            indent = line[: len(line) - len(line.lstrip())]
            i += 1
            block: list[str] = []
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
            ):
                block.append(lines[i])
                i += 1
            body = textwrap.dedent("\n".join(block)).strip("\n")
            out += [f"{indent}$$", *(f"{indent}{b}" for b in body.split("\n")), f"{indent}$$", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def rst_to_markdown(text: str, public: set[str]) -> str:
    text = _math_blocks(text)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    text = _ROLE.sub(lambda m: _link(m, public), text)
    text = re.sub(r"(\S)::[ \t]*$", r"\1:", text, flags=re.M)
    return text


class RstToMarkdown(griffe.Extension):
    """Rewrites every docstring of the package before mkdocstrings parses it."""

    def __init__(self) -> None:
        super().__init__()
        self._public = _public_names()

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value, self._public)
