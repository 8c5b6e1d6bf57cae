"""Sphinx fixes for the course's book build (loaded through ``_config.yml``'s ``local_extensions``).

sphinx-thebe 0.3 registers its inline configuration script (``const THEBE_JS_URL = ...``) with both
the application and the HTML builder under Sphinx 7, so every page declares the constants twice and
the browser reports a ``SyntaxError`` on each page. Identical scripts are kept once here.
"""

from __future__ import annotations

from typing import Any


def _dedupe_scripts(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    """Keep the first of identical script entries of a page (same file, same inline body; an inline
    script is filed under ``None`` by one registration and ``""`` by the other)."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple[str, str]] = set()
    kept = []
    for js in scripts:
        key = (str(getattr(js, "filename", js) or ""), str(getattr(js, "attributes", {}).get("body", "")))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    context["script_files"] = kept


def setup(app: Any) -> dict:
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
