"""MkDocs hook: Sphinx cross-reference roles in llmq's docstrings, shown as plain code on the API page.

The docstrings say ``:func:`llmq.api.quantize``` and ``:class:`~llmq.errors.ConfigError``` (they read well in
``help()`` too); mkdocstrings renders the role's name as text before the code span. This drops the role and the
``~`` that Sphinx uses to shorten a path, leaving the code span.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):<code>~?([^<]*)</code>")


def on_page_content(html: str, page, config, files, **kwargs) -> str:  # noqa: ANN001, ARG001
    return ROLE.sub(r"<code>\1</code>", html)
