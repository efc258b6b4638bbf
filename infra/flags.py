"""
One command-line convention for every script here: argparse, so `--key value` and `--key=value` both work,
a boolean is a bare `--flag` or `--flag=true|false`, and `--help` lists every option with its default.
A dataclass config becomes a parser with `dataclass_parser`; each field's help is its trailing comment in
the source, so the config's comments are the reference.
"""
import argparse
import dataclasses
import difflib
import inspect
import re


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a mistyped option gets its nearest real name, not the whole usage."""

    def error(self, message):
        hint = ""
        typo = re.match(r"unrecognized arguments: (\S+)", message)
        if typo:
            names = [o.lstrip("-") for a in self._actions for o in a.option_strings if a.help != argparse.SUPPRESS]
            near = difflib.get_close_matches(typo.group(1).split("=")[0].lstrip("-"), names, n=1)
            hint = f" (did you mean --{near[0]}?)" if near else ""
        self.exit(2, f"{self.prog}: error: {message}{hint}; see --help\n")


def to_bool(s) -> bool:
    if isinstance(s, bool):
        return s
    v = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(str(s).lower())
    if v is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return v


def add_bool(ap, name, default=False, help=""):
    """--flag (= true), --flag=true|false, --flag true|false."""
    ap.add_argument(name, nargs="?", const=True, default=default, type=to_bool, metavar="BOOL", help=help)


def field_help(cls) -> dict:
    """{field: its trailing '# comment' in cls's source}; an aligned comment line below continues it, and a
    field without one takes the block comment right above it."""
    out, last, block = {}, None, []
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [\w\[\], .]+ = .*?(?:#\s*(.*))?$", line)
        if m:
            last = m.group(1)
            out[last] = (m.group(2) or " ".join(block)).strip()
            block = []
        elif line.lstrip().startswith("#"):
            text = line.strip().lstrip("#").strip()
            if last and line.index("#") > 20:      # an aligned continuation of the field's comment
                out[last] += " " + text
            else:
                block, last = block + [text], None
        else:
            last, block = None, []
    return out


def dataclass_parser(cls, description="", choices=None, epilog=None) -> argparse.ArgumentParser:
    """A parser over cls's fields. Values absent from the command line are absent from the namespace
    (argparse.SUPPRESS), so a caller can layer presets under what the user typed."""
    ap = Parser(description=description, epilog=epilog, argument_default=argparse.SUPPRESS,
                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    helps, choices = field_help(cls), choices or {}
    for f in dataclasses.fields(cls):
        h = f"{helps.get(f.name, '')} (default: {f.default!r})".strip()
        if f.type in (bool, "bool"):
            ap.add_argument(f"--{f.name}", nargs="?", const=True, type=to_bool, metavar="BOOL", help=h)
        else:
            t = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            ap.add_argument(f"--{f.name}", type=t, choices=choices.get(f.name), metavar=f.name.upper(), help=h)
    return ap


def parse_dataclass(cls, argv, description=""):
    """cls(**defaults updated with the command line)."""
    ns = dataclass_parser(cls, description).parse_args(argv)
    return cls(**vars(ns))
