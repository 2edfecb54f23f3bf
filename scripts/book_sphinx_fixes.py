"""The book's own Sphinx extension (loaded through ``sphinx: local_extensions`` in ``_config.yml``).

1. Sphinx 7.4 writes an inline ``<script>`` twice when an extension registers it after the builder
   started: the registry keeps the filename ``None`` and ``prepare_writing`` re-adds it as ``""``,
   and the two do not compare equal. sphinx-thebe (always on in Jupyter Book 1) registers
   ``const THEBE_JS_URL = ...`` that way, so every page threw "Identifier 'THEBE_JS_URL' has
   already been declared" in the reader's console. Exact duplicates are dropped from each page.

2. The API reference lists every public function, class, method and property, with or without a
   docstring (``undoc-members``), so none goes missing from the appendix; but data attributes
   without a ``#:`` comment are left out: dataclass fields are described in their class's
   ``Attributes`` section, and listing them again would only repeat the names.

3. Constants are shown with their value only when it is short and plain: a registry's repr (with
   ``<function ...>``) or a path of the build machine says nothing to a reader and would run off
   a phone screen. The ``#:`` comment describes those.

4. napoleon reads the first line of an attribute or property docstring as ``type: description``
   (Google style), so "Schedule of the heads: ..." became the type "Schedule of the heads" and
   a broken cross-reference. The type comes from the annotation; the line stays prose.

5. A dataclass field with ``default_factory`` shows as ``= <factory>`` in the generated
   signature, which Sphinx cannot parse: the whole signature then prints as raw text (with
   ``~torch...`` prefixes, no line breaks). It is written ``= ...`` instead.

6. A private base class that only shares code between public classes (``live_index._TwoPartWrites``)
   is not part of the API: ``Bases:`` lists its own bases instead, so the reference does not point
   at a page that does not exist. The classes bind the shared methods themselves, so they are listed.
"""

from __future__ import annotations

import inspect

from sphinx.pycode import ModuleAnalyzer
from sphinx.errors import PycodeError
from sphinx.ext.autodoc import AttributeDocumenter, DataDocumenter
from sphinx.util.inspect import object_description

MAX_VALUE_CHARS = 60


def _drop_duplicate_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen, unique = set(), []
    for js in scripts:
        attrs = getattr(js, "attributes", {})
        key = (getattr(js, "filename", js) or "", getattr(js, "priority", None),
               tuple(sorted((k, str(v)) for k, v in attrs.items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def _is_data(obj) -> bool:
    return not (inspect.isroutine(obj) or inspect.isclass(obj)
                or isinstance(obj, (property, classmethod, staticmethod)))


def _skip_undocumented_data(app, what, name, obj, skip, options):
    if skip or what not in ("module", "class") or not _is_data(obj):
        return None
    # autodoc records which module and class it is documenting while it filters their members.
    modname = app.env.temp_data.get("autodoc:module")
    namespace = app.env.temp_data.get("autodoc:class", "") if what == "class" else ""
    try:
        documented = ModuleAnalyzer.for_module(modname).find_attr_docs()
    except (PycodeError, TypeError):
        return None
    return True if (namespace, name) not in documented else None


def _plain_short_value(obj) -> bool:
    try:
        text = object_description(obj)
    except Exception:  # noqa: BLE001 - an object whose repr fails shows no value
        return False
    return len(text) <= MAX_VALUE_CHARS and "<" not in text and "/" not in text


class ShortValueDataDocumenter(DataDocumenter):
    def should_suppress_value_header(self) -> bool:
        return super().should_suppress_value_header() or not _plain_short_value(self.object)


class ShortValueAttributeDocumenter(AttributeDocumenter):
    def should_suppress_value_header(self) -> bool:
        return super().should_suppress_value_header() or not _plain_short_value(self.object)


def _no_inline_attribute_type(app, what, name, obj, options, lines) -> None:
    # Runs before napoleon, which then reads an empty reST comment ("..") as the first line: no
    # "type:" prefix to split off, and nothing extra on the page.
    if what in ("attribute", "data", "property") and lines and lines[0].strip():
        lines[:0] = ["..", ""]


def _factory_defaults(app, what, name, obj, options, signature, return_annotation):
    if signature and "<factory>" in signature:
        return signature.replace("<factory>", "..."), return_annotation
    return None


def _public_bases(app, name, obj, options, bases: list) -> None:
    # Replace private bases by their own bases (recursively), in place, keeping the order.
    out = []
    for base in bases:
        stack = [base]
        while stack:
            b = stack.pop(0)
            if b.__name__.startswith("_") and b.__module__.startswith("backfill_lib"):
                stack = list(b.__bases__) + stack
            elif b not in out:
                out.append(b)
    bases[:] = [b for b in out if b is not object] or [object]


def setup(app):
    # After every other html-page-context handler (myst-nb adds the widget scripts there).
    app.connect("html-page-context", _drop_duplicate_scripts, priority=900)
    app.connect("autodoc-skip-member", _skip_undocumented_data)
    app.connect("autodoc-process-signature", _factory_defaults)
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("autodoc-process-docstring", _no_inline_attribute_type, priority=400)
    app.add_autodocumenter(ShortValueDataDocumenter, override=True)
    app.add_autodocumenter(ShortValueAttributeDocumenter, override=True)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
