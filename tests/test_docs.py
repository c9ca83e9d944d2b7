"""The docs cannot drift: README.md and docs/*.md are checked against the repository and code.

* every relative link and ``#anchor`` resolves (GitHub's heading slugs), and no link points at
  a git-ignored file;
* every flag of every ``klppo-bench`` command appears in that command's section of the
  command-line reference (a heading naming ``klppo-bench <command>``), every spec key and
  every ``train.*`` / ``model.*`` / ``eval.*`` field in docs/sweeps.md, every parameter of a
  built-in variant in docs/variants.md;
* the fenced blocks whose info string is ``bash example`` or ``python example`` run, in page
  order, in one scratch directory holding links to ``experiments/`` and ``examples/`` with
  ``klppo-bench`` on the PATH (so ``results/`` there is scratch).

The flags and keys are read from the code (the argparse parser, the spec loader's key lists,
the config dataclasses, the variant registry), so a new flag or key fails here until it is
documented.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
EXAMPLE_LANGUAGES = ("bash", "python")

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
_HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.I)
_HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:name|id)=\"([^\"]+)\"", re.I)
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def split_markdown(text: str) -> tuple[list[tuple[int, str]], list[dict]]:
    """``(prose, blocks)``: the lines outside fenced code as ``(line number, line)``, and
    each fenced block as ``{"info", "code", "line"}`` (CommonMark fences: a closing fence
    uses the opening character, at least as many times, and has no info string)."""
    prose, blocks, fence = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None:
            if m and not (m.group(1)[0] == "`" and "`" in m.group(2)):
                fence = {"mark": m.group(1), "info": m.group(2).strip(), "line": number,
                         "code": []}
            else:
                prose.append((number, line))
        elif m and m.group(1)[0] == fence["mark"][0] and len(m.group(1)) >= len(fence["mark"]) \
                and not m.group(2).strip():
            blocks.append({"info": fence["info"], "code": "\n".join(fence["code"]) + "\n",
                           "line": fence["line"]})
            fence = None
        else:
            fence["code"].append(line)
    assert fence is None, f"unclosed code fence opened at line {fence['line']}"
    return prose, blocks


def prose_text(path: Path) -> str:
    """The page outside fenced code, with inline code spans' backticks kept."""
    prose, _ = split_markdown(path.read_text())
    return "\n".join(line for _, line in prose)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (inline code and link text kept, markup
    dropped), lower-cased, every character but letters, digits, ``_``, ``-`` and spaces
    removed, spaces turned into ``-``."""
    text = _CODE_SPAN.sub(lambda m: m.group(2).strip(), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text).replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown page: heading slugs (repeats numbered ``-1``, ``-2``, as
    GitHub does) and explicit ``<a name=...>`` / ``id=`` anchors."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in split_markdown(path.read_text())[0]:
        m = _HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
        out.update(_HTML_ANCHOR.findall(line))
    return out


def links(path: Path) -> list[str]:
    """Every link target of a page outside code (inline links, images, reference
    definitions, HTML ``href``/``src``)."""
    text = _CODE_SPAN.sub("CODE", prose_text(path))
    return _LINK.findall(text) + _REF_DEF.findall(text) + _HTML_LINK.findall(text)


def is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("//")


def _git_ignored(paths: list[Path]) -> set[Path]:
    if not (ROOT / ".git").exists() or shutil.which("git") is None or not paths:
        return set()
    result = subprocess.run(["git", "check-ignore", "--stdin"], cwd=ROOT, capture_output=True,
                            text=True, input="\n".join(str(p.relative_to(ROOT)) for p in paths))
    return {ROOT / line for line in result.stdout.splitlines() if line.strip()}


def test_slugs_follow_github():
    assert slug("Watching runs: TensorBoard, W&B, MLflow, CSV") == \
        "watching-runs-tensorboard-wb-mlflow-csv"
    assert slug("`klppo-bench report`") == "klppo-bench-report"
    assert slug("The training set-up: defaults and every deviation") == \
        "the-training-set-up-defaults-and-every-deviation"
    assert slug("An [API](api.md) *page*, `kb.load_runs`") == "an-api-page-kbload_runs"


def test_split_markdown_keeps_code_out_of_prose():
    prose, blocks = split_markdown("a [x](y.md)\n```bash example\nls [z](w.md)\n```\nb\n"
                                   "````\n```\nnot closed\n````\n")
    assert [line for _, line in prose] == ["a [x](y.md)", "b"]
    assert [(b["info"], b["code"]) for b in blocks] == [("bash example", "ls [z](w.md)\n"),
                                                       ("", "```\nnot closed\n")]


def test_pages_exist():
    names = {p.name for p in PAGES}
    for page in ("index.md", "getting-started.md", "variants.md", "sweeps.md", "statistics.md",
                 "engines.md", "speed.md", "changelog.md"):
        assert page in names, f"docs/{page} is missing"
    assert len((ROOT / "README.md").read_text()) < 10_000, "README.md must stay under 10,000 " \
        "characters: move detail into docs/"
    assert "make test" in (ROOT / "README.md").read_text()  # CI runs the command README names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    problems, checked = [], []
    for target in links(page):
        if not is_relative(target):
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            problems.append(f"{target}: no such file {dest}")
            continue
        if ROOT not in dest.parents and dest != ROOT:
            problems.append(f"{target}: outside the repository")
            continue
        checked.append(dest)
        if anchor:
            if dest.suffix != ".md":
                problems.append(f"{target}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{target}: no heading with anchor #{anchor} in {dest.name} "
                                f"(anchors: {', '.join(sorted(anchors(dest)))})")
    for dest in sorted(_git_ignored(checked)):
        problems.append(f"{dest.relative_to(ROOT)}: git-ignored (readers of a clone do not "
                        "have it)")
    assert not problems, f"{page.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


# ------------------------------------------------------------------ flags and spec keys

def command_flags() -> dict[str, list[str]]:
    """``{command: [--flag, ...]}`` of every ``klppo-bench`` subcommand, from its parser."""
    from klppo_bench.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: [o for action in p._actions for o in action.option_strings
                   if o.startswith("--") and o != "--help"]
            for name, p in sub.choices.items()}


def sections(path: Path) -> list[tuple[str, int, str]]:
    """``(heading text, level, section text up to the next heading of that level or
    higher)`` for every heading of a page."""
    lines = [line for _, line in split_markdown(path.read_text())[0]]
    heads = [(i, len(m.group(1)), m.group(2)) for i, line in enumerate(lines)
             if (m := _HEADING.match(line))]
    out = []
    for k, (i, level, text) in enumerate(heads):
        end = next((j for j, lv, _ in heads[k + 1:] if lv <= level), len(lines))
        out.append((text, level, "\n".join(lines[i + 1:end])))
    return out


def mentions(text: str, token: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(token)}(?![\w-])", text) is not None


def test_every_cli_flag_is_documented_in_its_command_section():
    doc_sections = [s for page in PAGES for s in sections(page)]
    problems = []
    for command, flags in command_flags().items():
        homes = [body for text, _, body in doc_sections
                 if re.search(rf"klppo-bench {re.escape(command)}(?![\w-])", text)]
        if not homes:
            problems.append(f"no docs section whose heading names `klppo-bench {command}` "
                            "(add one to the command-line reference in docs/sweeps.md)")
            continue
        for flag in flags:
            if not any(mentions(body, flag) for body in homes):
                problems.append(f"`klppo-bench {command} {flag}` is not in the "
                                f"`klppo-bench {command}` section of the docs "
                                "(docs/sweeps.md, command-line reference)")
    assert not problems, "\n".join(problems)


def test_every_spec_key_and_harness_field_is_documented():
    from klppo_bench import spec
    from klppo_bench.config import SECTIONS

    text = prose_text(DOCS / "sweeps.md")
    wanted = [f"`{k}`" for k in (*spec.TOP_KEYS, *spec.VARIANT_KEYS, *spec.DERIVED_OPS)]
    wanted += [f"`{section}.{f.name}`" for section, cls in SECTIONS.items() for f in fields(cls)]
    missing = [w for w in wanted if w not in text]
    assert not missing, f"docs/sweeps.md does not document the spec keys {', '.join(missing)}"


def test_every_builtin_variant_and_parameter_is_documented():
    from klppo_bench.variants import all_variants, variant_source

    text = prose_text(DOCS / "variants.md")
    builtins = {n: v for n, v in all_variants().items() if variant_source(n)["kind"] == "builtin"}
    assert len(builtins) >= 6
    missing = sorted({f"`{k}`" for v in builtins.values() for k in v.params} |
                     {f"`{alias}`" for v in builtins.values() for alias in v.aliases})
    missing = [w for w in missing if w not in text]
    missing += [n for n in builtins if n not in (DOCS / "variants.md").read_text()]
    assert not missing, f"docs/variants.md does not document {', '.join(missing)}"


# ------------------------------------------------------------------ runnable examples

def example_blocks(page: Path) -> list[dict]:
    blocks = split_markdown(page.read_text())[1]
    return [b for b in blocks if b["info"].split()[1:2] == ["example"]]


EXAMPLE_PAGES = [p for p in PAGES if example_blocks(p)]


def example_workdir(base: Path) -> Path:
    """The scratch directory examples run in: links to the repository's ``experiments/`` and
    ``examples/``; ``results/`` there is scratch. Shared by every example (and the notebook
    test), so a sweep one example ran is found done by the next."""
    work = base / "docs-examples"
    work.mkdir(exist_ok=True)
    for name in ("experiments", "examples"):
        if not (work / name).exists():
            (work / name).symlink_to(ROOT / name, target_is_directory=True)
    return work


def example_env() -> dict:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def run_example(block: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    language = block["info"].split()[0]
    assert language in EXAMPLE_LANGUAGES, \
        f"example at line {block['line']}: {language!r}; allowed: {', '.join(EXAMPLE_LANGUAGES)}"
    cmd = (["bash", "-euo", "pipefail", "-c", block["code"]] if language == "bash"
           else [sys.executable, "-c", block["code"]])
    return subprocess.run(cmd, cwd=cwd, env=example_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_some_examples_are_marked():
    assert any(b["info"].startswith("bash") for p in EXAMPLE_PAGES for b in example_blocks(p))
    assert any(b["info"].startswith("python") for p in EXAMPLE_PAGES for b in example_blocks(p))


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(page, tmp_path_factory):
    work = example_workdir(tmp_path_factory.getbasetemp())
    for block in example_blocks(page):
        result = run_example(block, work)
        assert result.returncode == 0, (
            f"{page.relative_to(ROOT)}, example at line {block['line']} exited "
            f"{result.returncode}:\n{block['code']}\n--- stdout\n{result.stdout[-3000:]}"
            f"\n--- stderr\n{result.stderr[-3000:]}")
