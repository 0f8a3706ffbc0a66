r"""An mkdocs hook: the site's math as MathML, rendered at build time.

pymdownx.arithmatex (generic mode) leaves each formula as its TeX source, for a
JavaScript renderer to typeset in the browser: ``<span class="arithmatex">\(...\)</span>``
inline, ``<div class="arithmatex">\[...\]</div>`` for a block. Here latex2mathml turns
each into a ``<math>`` element when the page is built, inside the same wrapper, so the
browser lays the formulas out itself (MathML Core: Chromium, Firefox, Safari) with no
script and no network. A formula latex2mathml cannot convert is a warning, which
``mkdocs build --strict`` turns into a failed build.
"""

from __future__ import annotations

import html
import logging
import re
from typing import Any

from latex2mathml.converter import convert

log = logging.getLogger("mkdocs.hooks.mathml")

_ARITHMATEX = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?P<open>\\\(|\\\[)(?P<tex>.*?)'
    r"(?P<close>\\\)|\\\])\s*</(?P=tag)>",
    re.S,
)


# TeX that latex2mathml takes differently from TeX, rewritten first (the annotation keeps
# the source as written):
_REWRITES = [
    # A row break with extra space, \\[4pt]: the space would print as "[4pt]".
    (re.compile(r"\\\\\[[^\]]*\]"), r"\\\\"),
    # \lVert x \rVert becomes a bare <mo>, which the browser stretches to the whole row;
    # \| and | are the same symbols, marked not stretchy.
    (re.compile(r"\\[lr]Vert(?![a-zA-Z])"), r"\\|"),
    (re.compile(r"\\[lr]vert(?![a-zA-Z])"), "|"),
]


def to_mathml(tex: str, *, display: bool) -> str:
    """One formula's TeX source (no delimiters) as a ``<math>`` element, the source kept
    in an annotation (copy and paste, and readers that cannot show MathML, get the TeX)."""
    tex = tex.strip()
    source = tex
    for pattern, replacement in _REWRITES:
        source = pattern.sub(replacement, source)
    mathml = convert(source, display="block" if display else "inline")
    start, end = mathml.index(">") + 1, mathml.rindex("</math>")
    annotation = f'<annotation encoding="application/x-tex">{html.escape(tex)}</annotation>'
    return (
        f"{mathml[:start]}<semantics><mrow>{mathml[start:end]}</mrow>{annotation}"
        f"</semantics>{mathml[end:]}"
    )


def on_page_content(content: str, page: Any, **kwargs: Any) -> str:
    """Replaces the TeX of every arithmatex formula on the page by MathML."""

    def one(match: re.Match[str]) -> str:
        tag, tex = match["tag"], html.unescape(match["tex"])
        try:
            mathml = to_mathml(tex, display=match["open"] == "\\[")
        except Exception as error:  # latex2mathml raises its own types and plain ones
            log.warning("%s: cannot render %r as MathML: %s", page.file.src_uri, tex, error)
            return match.group(0)
        return f'<{tag} class="arithmatex">{mathml}</{tag}>'

    return _ARITHMATEX.sub(one, content)
