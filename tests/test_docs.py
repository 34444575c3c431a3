"""The pages say what is true: every relative link of README.md, CHANGELOG.md, engines/README.md
and docs/*.md resolves (a file in the repository; an `#anchor` to one of its headings, slugged
as GitHub does), nothing links outside the repository, and every `sdrun`/`sdexport` command
shown in a fenced block names a subcommand that exists and only options its `--help` lists.
docs/cli.md's reference is what scripts/cli_reference.py writes from the commands today."""
from __future__ import annotations

import re
import shlex
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "engines" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
PROGRAMS = ("sdrun", "sdexport")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


SHELL = ("", "bash", "sh", "shell", "console")


def fenced_blocks(text: str):
    """(first line number, [lines]) of each fenced code block in a shell language (or none)."""
    block: list[str] | None = None
    start, lang = 0, ""
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            if block is None:
                block, start, lang = [], n + 1, line.strip().strip("`~").strip().lower()
            else:
                if lang in SHELL:
                    yield start, block
                block = None
        elif block is not None:
            block.append(line)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed
    (but - and _), spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.add(base if k == 0 else f"{base}-{k}")
    return frozenset(out)


def links(path: Path):
    """(line number, target) of every markdown link outside code (inline code spans removed)."""
    for n, line in prose_lines(path.read_text()):
        line = re.sub(r"(`+).*?\1", "", line)
        for m in LINK.finditer(line):
            yield n, m.group(1)
        for m in REF_LINK.finditer(line):
            yield n, m.group(1)


def link_problem(page: Path, target: str) -> str | None:
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
        return "links outside the repository (keep links relative, to files in it)"
    path_part, _, anchor = target.partition("#")
    if path_part.startswith("/") or path_part.startswith("~"):
        return "an absolute path"
    dest = (page.parent / path_part).resolve() if path_part else page
    if dest != ROOT and ROOT not in dest.parents:
        return "points outside the repository"
    if not dest.exists():
        return f"no such file: {rel(dest) if ROOT in dest.parents else dest}"
    if anchor:
        if dest.suffix != ".md":
            return "an anchor into a file that is not a markdown page"
        if anchor not in anchors(dest):
            return f"no heading with anchor #{anchor} in {rel(dest)}"
    return None


def test_the_pages_exist():
    names = {p.name for p in PAGES}
    for page in ("benchmarks.md", "cli.md", "serving.md", "training.md", "caching.md", "bundle-format.md",
                 "architecture.md", "departures.md", "triton.md", "CHANGELOG.md"):
        assert page in names, f"{page} is missing"
    assert len(PAGES[0].read_text().splitlines()) < 300, "README.md: keep it under 300 lines"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_link_resolves_inside_the_repository(page):
    wrong = [f"{rel(page)}:{n}: {target}: {problem}" for n, target in links(page)
             if (problem := link_problem(page, target))]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_no_page_mentions_the_shared_folder(page):
    text = page.read_text()
    for needle in ("../shared", "shared/DESIGN", "shared/FACTS", "FACTS.md", "DESIGN.md"):
        assert needle not in text, f"{rel(page)} mentions {needle}: a file outside the repository"


def test_the_link_checker_catches_what_it_should(tmp_path):
    page = ROOT / "docs" / "cli.md"
    assert link_problem(page, "../README.md") is None
    assert link_problem(page, "serving.md#test-sets-on-a-ray-cluster") is None
    assert link_problem(page, "#reference") is None
    assert "no heading" in link_problem(page, "serving.md#no-such-heading")
    assert "no such file" in link_problem(page, "nowhere.md")
    assert "outside" in link_problem(page, "../../shared/DESIGN.md")
    assert "outside" in link_problem(page, "https://example.com/")
    assert "absolute" in link_problem(page, "/etc/passwd")
    assert slug("`sdrun serve`") == "sdrun-serve"
    assert slug("OpenVINO, and bf16 where the CPU has it") == "openvino-and-bf16-where-the-cpu-has-it"
    assert slug("Memory: every model call fits") == "memory-every-model-call-fits"
    assert [t for _, t in links(_write(tmp_path, "[a](x.md) `[b](y.md)` ![c](img.png)\n```\n[d](z.md)\n```\n"))] \
        == ["x.md", "img.png"]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "page.md"
    p.write_text(text)
    return p


# ---- commands in fenced blocks --------------------------------------------------------

@lru_cache(maxsize=None)
def help_text(program: str, *args: str) -> str:
    from click.testing import CliRunner

    if program == "sdrun":
        from sdrun.cli import main
    else:
        from sdexport.cli import main
    res = CliRunner().invoke(main, [*args, "--help"], terminal_width=200)
    assert res.exit_code == 0, f"{program} {' '.join(args)} --help: {res.output}"
    return res.output


def section(help_out: str, title: str) -> list[str]:
    lines, inside = [], False
    for line in help_out.splitlines():
        if line.strip() == f"{title}:":
            inside = True
        elif inside and line and not line.startswith(" "):
            break
        elif inside:
            lines.append(line)
    return lines


@lru_cache(maxsize=None)
def subcommands(program: str) -> frozenset[str]:
    return frozenset(m.group(1) for line in section(help_text(program), "Commands")
                     if (m := re.match(r"^  (\S+)", line)))


@lru_cache(maxsize=None)
def options(program: str, *sub: str) -> frozenset[str]:
    """The options `PROGRAM [SUB] --help` lists (each spelling: -v, --verbose, --no-x)."""
    out = set()
    for line in section(help_text(program, *sub), "Options"):
        m = re.match(r"^  (-\S.*?)(?:\s{2,}|$)", line)
        if m:
            out.update(re.findall(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)", m.group(1)))
    return frozenset(out)


def is_program(token: str) -> str | None:
    """`sdrun`, `.venv/bin/sdrun`, `$VENV/bin/sdrun` -> "sdrun"; a folder such as
    `runtime/sdrun/` is not a command."""
    for program in PROGRAMS:
        if token == program or token.endswith(f"/bin/{program}"):
            return program
    return None


def commands(text: str):
    """(line number, tokens) of each `sdrun`/`sdexport` command in the fenced blocks: lines
    joined at a trailing backslash, comments dropped, `[...]` (optional parts) unwrapped,
    split at ; && || and |."""
    for start, block in fenced_blocks(text):
        joined: list[tuple[int, str]] = []
        pending, first = "", 0
        for k, line in enumerate(block):
            if not pending:
                first = start + k
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            joined.append((first, pending + line))
            pending = ""
        if pending:
            joined.append((first, pending))
        for n, line in joined:
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue  # not shell (a Python or JSON line with an odd quote)
            part: list[str] = []
            for tok in tokens + [";"]:
                if tok in (";", "&&", "||", "|"):
                    if part and (program := is_program(part[0])):
                        yield n, [program] + [t.strip("[]") for t in part[1:]]
                    part = []
                else:
                    part.append(tok)


def command_problem(tokens: list[str]) -> str | None:
    program, rest = tokens[0], [t for t in tokens[1:] if t]
    group_opts = options(program)
    while rest and rest[0].startswith("-"):
        if rest[0].split("=")[0] not in group_opts:
            return f"{program} has no option {rest[0]}"
        rest = rest[1:]
    if not rest:
        return None  # `sdrun --help`
    sub = rest[0]
    if sub not in subcommands(program):
        return f"{program} has no command {sub!r} (it has {', '.join(sorted(subcommands(program)))})"
    known = options(program, sub)
    for tok in rest[1:]:
        if re.match(r"^--?[A-Za-z]", tok):
            name = tok.split("=")[0]
            if name not in known:
                return f"`{program} {sub}` has no option {name} (its --help lists {', '.join(sorted(known))})"
    return None


def test_the_pages_show_commands():
    found = [c for page in PAGES for c in commands(page.read_text())]
    assert len(found) > 40
    shown = {tuple(tokens[:2]) for _, tokens in found}
    for program in PROGRAMS:
        assert {(program, sub) for sub in subcommands(program)} <= shown | {("sdexport", "measure-memory")}, \
            f"a {program} command appears in no fenced block"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_command_shown_exists_with_its_options(page):
    wrong = [f"{rel(page)}:{n}: {' '.join(tokens)}\n    {problem}" for n, tokens in commands(page.read_text())
             if (problem := command_problem(tokens))]
    assert not wrong, "\n".join(wrong)


def test_the_command_checker_catches_what_it_should():
    text = ("```text\nsdrun nonsense in a text block\n```\n"
            "```bash\nsdrun run B --data D --out s.csv \\\n    [--resume [--force-rerun]]  # a comment --nope\n"
            "sdrun tune B --csv t.csv --no-such-option && sdrun nosuch B\nruntime/sdrun/    the runtime\n"
            ".venv/bin/sdexport build --out X --preset tiny-random\npython benchmarks/latency.py --whatever\n```\n")
    found = list(commands(text))
    assert [tokens[:2] for _, tokens in found] == [["sdrun", "run"], ["sdrun", "tune"], ["sdrun", "nosuch"],
                                                   ["sdexport", "build"]]
    problems = [command_problem(tokens) for _, tokens in found]
    assert problems[0] is None and problems[3] is None
    assert "no option --no-such-option" in problems[1]
    assert "no command 'nosuch'" in problems[2]
    assert "--memory-budget" in options("sdrun", "serve") and "-v" in options("sdrun")


def test_the_cli_reference_is_current(capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import cli_reference
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert cli_reference.main(["--check"]) == 0, capsys.readouterr().err
