"""MkDocs hook: resolve and check the links in chapter (notebook) pages.

mkdocs-jupyter renders a notebook to HTML itself, so MkDocs never sees its Markdown links: a
``[text](../api/ring.md)`` in a chapter would stay ``../api/ring.md`` in the built page (a dead
link) and a typo would pass ``--strict`` silently. After a notebook page is rendered, this hook
rewrites every relative link to a ``.md``, ``.py`` or ``.ipynb`` source into the URL MkDocs gives
that page, and logs a warning (fatal under ``--strict``) for a target that does not exist.
Registered in mkdocs.yml (``hooks:``); this folder is excluded from the site.
"""

from __future__ import annotations

import logging
import posixpath
import re

log = logging.getLogger("mkdocs.hooks.notebook_links")
LINK = re.compile(r'href="(?!https?:|mailto:|#|/)([^"#]+\.(?:md|py|ipynb))(#[^"]*)?"')
NOTEBOOK_SUFFIXES = (".py", ".ipynb")


def on_page_content(html: str, page, config, files) -> str:
    """Rewrite a notebook page's source links to their pages' URLs; warn on missing targets."""
    source = page.file.src_uri
    if not source.endswith(NOTEBOOK_SUFFIXES):
        return html

    def resolve(found: re.Match) -> str:
        target = posixpath.normpath(posixpath.join(posixpath.dirname(source), found.group(1)))
        linked = files.get_file_from_path(target)
        if linked is None:
            log.warning(f"{source}: link to {found.group(1)!r}, which is not in the docs")
            return found.group(0)
        here = page.url.rstrip("/") or "."  # directory URLs: the page is its own folder
        url = posixpath.relpath(linked.url or ".", here)
        url = url if url.endswith("/") or "." in posixpath.basename(url) else url + "/"
        return f'href="{url}{found.group(2) or ""}"'

    return LINK.sub(resolve, html)
