"""MkDocs hook: the CLI reference page, rendered from llmq's own argparse parser.

On ``reference/cli.md`` the marker line ``<!-- cli-reference -->`` is replaced by the markdown that
:func:`render_cli_reference` makes from :func:`llmq.cli.build_parser`: every subcommand, its help and
description, its usage line and a table of every argument (all option strings, metavar or choices, default,
help). Nothing on that page is copied by hand, so it cannot drift from ``llmq <command> --help``;
``tests/test_docs.py`` checks that every option string the help prints is on the page.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MARKER = "<!-- cli-reference -->"
PAGE = "reference/cli.md"
ROOT = Path(__file__).resolve().parents[2]  # the checkout: document its llmq, not an installed copy


def _prose(text: str) -> str:
    """Help text as one line of markdown that shows it as typed: HTML and emphasis characters escaped."""
    text = " ".join(str(text).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for char in "\\`*_[]":
        text = text.replace(char, "\\" + char)
    return text


def _cell(text: str) -> str:
    """Help text for one cell of a markdown table: :func:`_prose` with pipes escaped."""
    return _prose(text).replace("|", "\\|")


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, one-line help, parser)`` of each subcommand, in the order ``--help`` lists them."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return out


def _value(action: argparse.Action) -> str:
    """What the option takes: its choices or its metavar, in the form ``--help`` prints."""
    if action.nargs == 0:
        return ""
    if action.choices is not None and action.metavar is None:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    metavar = action.metavar or (action.dest if not action.option_strings else action.dest.upper())
    return f"`{metavar}`" if isinstance(metavar, str) else " ".join(f"`{m}`" for m in metavar)


def _default(action: argparse.Action) -> str:
    if action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0 and action.default is False:
        return ""
    return f"`{action.default}`"


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help or action.help is argparse.SUPPRESS:
        return ""
    return parser._get_formatter()._expand_help(action)  # %(default)s and the like, as --help prints them


def _arguments_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | value | default | description |", "| --- | --- | --- | --- |"]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        if action.option_strings:
            name = ", ".join(f"`{s}`" for s in action.option_strings)
        else:
            name = f"`{action.metavar or action.dest}` (positional{', optional' if action.nargs == '?' else ''})"
        flags = " (required)" if action.required and action.option_strings else ""
        rows.append(f"| {name}{flags} | {_value(action) if action.option_strings else ''} | {_default(action)} "
                    f"| {_cell(_help(parser, action))} |")
    return rows


def _usage(parser: argparse.ArgumentParser) -> list[str]:
    """The usage lines as ``--help`` prints them, without the ``usage:`` label (continuations dedented)."""
    first, *rest = parser.format_usage().rstrip().splitlines()
    label = "usage: "
    return ["```text", first.removeprefix(label), *(line.removeprefix(" " * len(label)) for line in rest), "```"]


def render_cli_reference(parser: argparse.ArgumentParser) -> str:
    """Markdown for every subcommand of ``parser``: a section each, with usage and a table of its arguments."""
    lines = [f"`{parser.prog}` takes these options before the subcommand:", "", *_arguments_table(parser), ""]
    subcommands = _subcommands(parser)
    lines += ["Subcommands:", ""]
    lines += [f"- [`{parser.prog} {name}`](#{parser.prog}-{name}): {_cell(help_)}" for name, help_, _ in subcommands]
    for name, help_, sub in subcommands:
        lines += ["", f"## {parser.prog} {name}", ""]
        if help_:
            lines += [_prose(help_[0].upper() + help_[1:] + ("" if help_.endswith(".") else ".")), ""]
        lines += [*_usage(sub), ""]
        if sub.description and sub.description != help_:
            for paragraph in sub.description.split("\n\n"):
                lines += [_prose(paragraph), ""]
        lines += _arguments_table(sub)
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:  # noqa: ANN001, ARG001
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{PAGE} has no {MARKER} line for the generated CLI reference")
    if sys.path[0] != str(ROOT):
        sys.path.insert(0, str(ROOT))
    from llmq.cli import build_parser

    return markdown.replace(MARKER, render_cli_reference(build_parser()))
