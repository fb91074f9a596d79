"""Griffe extension: find subpackages that setuptools ``package-dir`` maps to other folders.

sptutor installs ``sptutor.oracle`` from ``oracle/`` and ``sptutor.kernels`` from ``kernels/``
(``[tool.setuptools.package-dir]`` in pyproject.toml). Python imports them through the editable
finder, but griffe (mkdocstrings' static analysis) only walks the ``sptutor/`` folder, so
``::: sptutor.oracle.reference`` would fail with ``KeyError: 'oracle'``.

When griffe loads a top-level package, this extension reads the mapping from pyproject.toml and
visits each remapped folder as a submodule of its parent (recursively), with the loader's own
parser, options and collections. Nothing is imported; no symlinks are needed.

Used from mkdocs.yml (mkdocstrings ``extensions`` option); this folder is excluded from the site.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import griffe

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

_ROOT = Path(__file__).resolve().parents[2]  # docs/hooks/ -> project root


class PackageDir(griffe.Extension):
    """Attach ``package-dir`` remapped subpackages to the package griffe just loaded."""

    def __init__(self, pyproject: str = "pyproject.toml") -> None:
        path = Path(pyproject)
        path = path if path.is_absolute() else _ROOT / path
        config = tomllib.loads(path.read_text(encoding="utf-8"))
        mapping = config.get("tool", {}).get("setuptools", {}).get("package-dir", {})
        # Parents before children: "a.b" must exist before "a.b.c" is attached to it.
        self.mapping = {
            name: (path.parent / folder).resolve()
            for name, folder in sorted(mapping.items(), key=lambda item: item[0].count("."))
            if "." in name  # top-level packages are found by griffe's normal search
        }

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for name, folder in self.mapping.items():
            parent_name, _, child = name.rpartition(".")
            if name.split(".", 1)[0] != pkg.name:
                continue
            try:
                parent = loader.modules_collection.get_member(parent_name)
            except KeyError:
                continue
            init = folder / "__init__.py"
            if child in parent.members or not init.exists():
                continue  # griffe already found it (folder at the usual place), or nothing to load
            module = self._visit(loader, child, init, parent)
            parent.set_member(child, module)
            self._load_submodules(loader, module)
            loader.expand_exports(module)
            loader.expand_wildcards(module, external=False)

    @staticmethod
    def _visit(
        loader: griffe.GriffeLoader, name: str, path: Path, parent: griffe.Module
    ) -> griffe.Module:
        code = path.read_text(encoding="utf-8-sig")
        loader.lines_collection[path] = code.splitlines(keepends=False)
        return griffe.visit(
            name,
            filepath=path,
            code=code,
            parent=parent,
            extensions=loader.extensions,
            docstring_parser=loader.docstring_parser,
            docstring_options=loader.docstring_options,
            lines_collection=loader.lines_collection,
            modules_collection=loader.modules_collection,
        )

    def _load_submodules(self, loader: griffe.GriffeLoader, module: griffe.Module) -> None:
        # finder.submodules yields (name parts relative to `module`, file), parents first.
        for parts, path in loader.finder.submodules(module):
            if path.suffix != ".py":
                continue
            owner = module
            for part in parts[:-1]:
                owner = owner.members.get(part)
                if owner is None or not owner.is_module:
                    break
            else:
                owner.set_member(parts[-1], self._visit(loader, parts[-1], path, owner))
