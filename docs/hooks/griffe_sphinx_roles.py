"""Griffe extension: render Sphinx roles in docstrings (``:func:`merge```) as API links.

Docstrings are Markdown for mkdocstrings, so a Sphinx role would show up literally as
":func:`merge`". This extension rewrites each role to the name in code font, linked to its API
entry when griffe can resolve the name in the docstring's scope. The link is an *optional*
autoref: if the target has no page, the name is shown unlinked instead of failing the build.

Used from mkdocs.yml (after ``PackageDir``, so remapped subpackages are covered too).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?:func|meth|class|mod|attr|data|const|exc|obj):`(~?)([^`<>]+?)(?:\(\))?`"
)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx cross-reference roles in every docstring of the loaded package."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self._rewrite(pkg)

    def _rewrite(self, obj: griffe.Object) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            text = obj.docstring.value
            obj.docstring.value = _ROLE.sub(lambda match: self._link(obj, match), text)
        for member in obj.members.values():
            if not member.is_alias:
                self._rewrite(member)

    @staticmethod
    def _link(obj: griffe.Object, match: re.Match) -> str:
        short, name = match.group(1), match.group(2)
        title = f"<code>{html.escape(name.rsplit('.', 1)[-1] if short else name)}</code>"
        try:
            target = obj.resolve(name)
        except griffe.NameResolutionError:
            target = name if "." in name else None
        if target is None:
            return title
        return f'<autoref identifier="{html.escape(target)}" optional>{title}</autoref>'
