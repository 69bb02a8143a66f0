"""The documentation: the site builds with every link checked, the CLI reference lists every option the parser has,
and the README stays a newcomer's page."""

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "hooks"))

from cli_reference import MARKER, render_cli_reference  # noqa: E402

from llmq.cli import build_parser  # noqa: E402

QUICKSTART = (
    "pip install torch==2.13.0 && pip install -e . && llmq demo",
    "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest -q",
)


def test_the_site_builds_strictly(tmp_path):
    """``mkdocs build --strict`` (mkdocs.yml: broken links and anchors are warnings, and warnings fail it); the
    API page's mkdocstrings blocks resolve and the CLI page is rendered."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]' (the test extra includes it)")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert MARKER not in cli and "--bits-per-weight" in cli
    assert "llmq.api.quantize" in (site / "reference" / "api" / "index.html").read_text()
    assert (site / "assets" / "demo-plot.png").is_file()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("llmq's parser has no subcommands")


def _help_options(help_text: str) -> set[str]:
    """Every option string ``--help`` prints: the invocation at the start of each argument's line (two spaces in,
    as argparse indents them), e.g. ``  -h, --help`` or ``  --sym, --no-sym`` or ``  --method {rtn,gptq}``."""
    options = set()
    for line in help_text.splitlines():
        m = re.match(r"  (-\S.*?)(?:\s{2,}|$)", line)
        if m:
            options |= set(re.findall(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)", m.group(1)))
    return options


def _help_positionals(sub: argparse.ArgumentParser) -> set[str]:
    text = sub.format_help()
    if "positional arguments:" not in text:
        return set()
    block = text.split("positional arguments:", 1)[1].split("\n\n", 1)[0]
    return {m.group(1) for m in re.finditer(r"^  (\w[\w-]*)", block, re.M)}


def _sections(markdown: str, prog: str) -> dict[str, str]:
    parts = re.split(rf"^## {prog} (\S+)\s*$", markdown, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_cli_reference_lists_every_subcommand_and_option():
    parser = build_parser()
    page = render_cli_reference(parser)
    sections = _sections(page, parser.prog)
    subs = _subparsers(parser)
    top_help = parser.format_help()
    for name in subs:
        assert name in top_help  # the subcommand --help lists ...
    assert set(sections) == set(subs), f"sections {sorted(sections)} != subcommands {sorted(subs)}"
    head = page.split(f"## {parser.prog} ", 1)[0]
    for option in _help_options(top_help):
        assert f"`{option}`" in head, f"global option {option} is missing from the CLI reference"
    for name, sub in subs.items():
        printed = _help_options(sub.format_help())
        assert printed, f"no options parsed from `llmq {name} --help`"
        missing = {o for o in printed if f"`{o}`" not in sections[name]}
        assert not missing, f"llmq {name}: options printed by --help but not in the reference: {sorted(missing)}"
        for positional in _help_positionals(sub):
            assert f"`{positional}` (positional" in sections[name], f"llmq {name}: positional {positional} missing"


def test_the_help_parser_sees_what_argparse_prints():
    """The check above can fail: options of every form are found in a real --help text."""
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, help="unlike --bogus, wrapped " * 8)
    p.add_argument("--method", choices=["a", "b"])
    p.add_argument("-n", "--nsamples-and-a-very-long-name-that-wraps", metavar="N", help="h")
    p.add_argument("model")
    found = _help_options(p.format_help())
    assert {"-h", "--help", "--sym", "--no-sym", "--method", "-n", "--nsamples-and-a-very-long-name-that-wraps"} \
        <= found
    assert "--bogus" not in found  # an option named in help text is not an option


def test_the_readme_is_short_and_keeps_the_quickstart():
    readme = (ROOT / "README.md").read_text()
    lines = readme.count("\n")
    assert lines <= 260, f"README.md has {lines} lines: move detail to docs/ (at most 260)"
    for command in QUICKSTART:
        assert command in readme, f"the quickstart command is missing from README.md: {command}"


def test_every_page_is_in_the_nav():
    """Every markdown page under docs/ is reachable from mkdocs.yml's nav (mkdocs only reports omitted pages)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)  # material's !!python/name tags
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)

    def pages(nav) -> set[str]:
        if isinstance(nav, str):
            return {nav}
        if isinstance(nav, dict):
            return set().union(*(pages(v) for v in nav.values()))
        return set().union(*(pages(v) for v in nav))

    docs = ROOT / "docs"
    on_disk = {p.relative_to(docs).as_posix() for p in docs.rglob("*.md")}
    assert on_disk == pages(config["nav"])
