"""A griffe extension for the API reference: Sphinx roles in the docstrings as Markdown.

The docstrings are Google style with Sphinx cross-reference roles (``:func:`estimate_masks```,
``:class:`~conceptlab.train.TrainConfig```). mkdocstrings reads docstrings as Markdown, where
a role would show as ``:func:`` text. Each role becomes a link to the object's entry in the
reference (an mkdocs-autorefs link) when the name resolves to a public, documented object of
the package, from the docstring's module or from the top, and inline code otherwise.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")


def _find(obj: griffe.Object, name: str):
    """The canonical path of ``name`` seen from ``obj``'s module, or None."""
    collection = obj.modules_collection
    module = obj.module
    scopes = [module.path] + [p.path for p in _parents(module)] + [""]
    for scope in scopes:
        path = f"{scope}.{name}" if scope else name
        try:
            found = collection.get_member(path)
        except (KeyError, ValueError, AttributeError, griffe.AliasResolutionError):
            continue
        target = found.target_path if found.is_alias else found.path
        try:  # mkdocstrings shows an object without a docstring nowhere: no link to it
            shown = collection.get_member(target).docstring is not None
        except (KeyError, ValueError, AttributeError, griffe.AliasResolutionError):
            shown = False
        if shown and not any(part.startswith("_") for part in target.split(".")):
            return target
    return None


def _parents(obj):
    while obj.parent is not None:
        obj = obj.parent
        yield obj


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        doc = obj.docstring
        if doc is None or ":`" not in doc.value:
            return

        def markdown(m: re.Match) -> str:
            name = m.group(2).strip()
            text = name.rsplit(".", 1)[-1] if m.group(1) else name
            target = _find(obj, name.rstrip("()"))
            return f"[`{text}`][{target}]" if target else f"`{text}`"

        doc.value = ROLE.sub(markdown, doc.value)
