"""Write the command reference of docs/cli.md from the commands themselves: every `sdrun` and
`sdexport` subcommand with its usage, its help text and each option as `--help` prints it,
between the markers `<!-- cli:begin -->` and `<!-- cli:end -->`.

    python scripts/cli_reference.py            # rewrite the block in docs/cli.md
    python scripts/cli_reference.py --check    # exit 1 when the block is out of date

Needs both packages importable (the dev venv, or PYTHONPATH=runtime:export); importing
the command lines imports no torch. tests/test_docs.py checks that the page is current.
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "cli.md"
BEGIN, END = "<!-- cli:begin -->", "<!-- cli:end -->"


def groups() -> list[tuple[str, click.Group]]:
    from sdexport.cli import main as sdexport_main
    from sdrun.cli import main as sdrun_main

    return [("sdrun", sdrun_main), ("sdexport", sdexport_main)]


def help_paragraphs(text: str) -> list[str]:
    """A command's help as markdown: prose paragraphs unwrapped; `\\b` blocks (examples,
    literal lines) as fenced blocks, shell commands as bash."""
    out = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(text)):
        lines = para.splitlines()
        if lines and lines[0].strip() == "\b":
            lines = lines[1:]
        literal = [ln for ln in lines if ln.startswith("  ")]
        if literal:
            head = [ln.strip() for ln in lines if not ln.startswith("  ")]
            if head:
                out.append(" ".join(head))
            body = "\n".join(ln.strip() for ln in literal)
            out.append(f"```bash\n{body}\n```" if re.match(r"(sdrun|sdexport) ", body) else f"```\n{body}\n```")
        else:
            out.append(" ".join(ln.strip() for ln in lines))
    return out


def render() -> str:
    parts = []
    for prog, group in groups():
        parts.append(f"### `{prog}`")
        ctx = click.Context(group, info_name=prog)
        parts.append(" ".join(help_paragraphs(group.help or "")[:1]))
        for name in group.list_commands(ctx):
            cmd = group.get_command(ctx, name)
            if cmd is None or cmd.hidden:
                continue
            sub = click.Context(cmd, info_name=f"{prog} {name}", parent=ctx)
            parts.append(f"#### `{prog} {name}`")
            parts.append(f"`{prog} {name} {' '.join(cmd.collect_usage_pieces(sub))}`")
            parts.extend(help_paragraphs(cmd.help or ""))
            options = []
            for param in cmd.get_params(sub):
                record = param.get_help_record(sub) if isinstance(param, click.Option) else None
                if record is None or "--help" in record[0]:
                    continue
                what, text = record
                options.append(f"- `{what}`" + (f": {text}" if text else ""))
            if options:
                parts.append("\n".join(options))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when out of date")
    ap.add_argument("--page", type=Path, default=PAGE)
    args = ap.parse_args(argv)
    text = args.page.read_text()
    if BEGIN not in text or END not in text:
        print(f"{args.page}: no {BEGIN} ... {END} block", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    old, tail = rest.split(END, 1)
    new = f"\n{render()}\n"
    if args.check:
        if old != new:
            print(f"{args.page}: the command reference is out of date: python scripts/cli_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    args.page.write_text(f"{head}{BEGIN}{new}{END}{tail}")
    print(f"{args.page}: command reference written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
