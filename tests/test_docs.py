"""The README and docs/ say only what runs: every `python`/`torchrun` command they show names a script or
module that exists, `--help` on it exits 0 and lists every option the command passes, and every relative
link points to a file (and heading) that exists.

Oracle: the scripts' own argument parsers (`--help`, run from the repository root as a reader would) and
the file tree. Commands are read from fenced code blocks (each line, `&&` chains split, env assignments
such as `OMP_NUM_THREADS=1` skipped) and from inline `python ...` spans in the prose."""
import functools
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
# flags that select another parser of the same script: --help is asked with them
MODE_FLAGS = {"bench.py": ("--gpu",)}
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")


def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def command_lines(text):
    """Shell lines of the fenced blocks (continuations joined) and the inline `python ...` spans of the prose."""
    lines = []
    for block in FENCE.findall(text):
        lines += block.replace("\\\n", " ").splitlines()
    prose = FENCE.sub("", text)
    lines += re.findall(r"`(python [^`\n]+)`", prose)
    return lines


def parse(line):
    """(target, options) for each python/torchrun command of one shell line; target is ("-m", module) or
    (script,) plus any mode flag, options the `--names` the command passes."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:                         # not shell (a prose fragment): nothing to run
        return []
    segments, current = [], []
    for tok in tokens:
        if tok in ("&&", "||", ";", "|"):
            segments.append(current)
            current = []
        else:
            current.append(tok)
    segments.append(current)
    found = []
    for seg in segments:
        while seg and ENV_ASSIGNMENT.match(seg[0]):
            seg = seg[1:]
        if not seg or seg[0] not in ("python", "python3", "torchrun"):
            continue
        if seg[0] == "torchrun":
            scripts = [i for i, t in enumerate(seg) if t.endswith(".py")]
            if not scripts:
                continue
            target, args = (seg[scripts[0]],), seg[scripts[0] + 1:]
        elif len(seg) > 2 and seg[1] == "-m":
            target, args = ("-m", seg[2]), seg[3:]
        elif len(seg) > 1:
            target, args = (seg[1],), seg[2:]
        else:
            continue
        target += tuple(f for f in MODE_FLAGS.get(target[0], ()) if f in args)
        options = {a[2:].split("=")[0] for a in args if re.match(r"^--[A-Za-z]", a)}
        found.append((target, options - {f[2:] for f in target[1:]}))
    return found


def collect(pages_text):
    """{target: {option: [pages that pass it]}} over all pages, targets deduplicated."""
    targets = {}
    for page, text in pages_text.items():
        for line in command_lines(text):
            for target, options in parse(line):
                uses = targets.setdefault(target, {})
                for o in options:
                    uses.setdefault(o, set()).add(page)
                uses.setdefault(None, set()).add(page)
    return targets


def missing(target):
    """Why the target cannot run from the repository root, or None."""
    if target[0] == "-m":
        module = target[1]
        local = os.path.join(ROOT, *module.split("."))
        if os.path.isfile(local + ".py") or os.path.isfile(os.path.join(local, "__main__.py")):
            return None
        if "." not in module and importlib.util.find_spec(module) is not None:
            return None                        # an installed tool (pytest)
        return f"no module {module} in the repository"
    if not os.path.isfile(os.path.join(ROOT, target[0])):
        return f"no file {target[0]} in the repository"
    return None


TARGETS = collect({p: read(p) for p in PAGES})


@functools.lru_cache(maxsize=None)
def help_text(target):
    p = subprocess.run([sys.executable, *target, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": ROOT})
    return p.returncode, p.stdout + p.stderr


def test_the_pages_show_the_commands_a_reader_needs():
    """The collection itself works: the demo, the tests, the moved experiments and the memory plan are found."""
    for t in [("train.py",), ("-m", "pytest"), ("-m", "experiments.study"), ("-m", "infra.memplan"),
              ("bench.py", "--gpu"), ("eval_gen.py",)]:
        assert t in TARGETS, t


@pytest.mark.parametrize("target", sorted(TARGETS), ids=lambda t: " ".join(t))
def test_every_command_runs_as_written(target):
    uses = TARGETS[target]
    why = missing(target)
    assert why is None, f"{why}; named in {sorted(uses[None])}"
    rc, out = help_text(target)
    assert rc == 0, (target, out[-2000:])
    unknown = {o: sorted(pages) for o, pages in uses.items()
               if o is not None and not re.search(rf"(?<![\w-])--{re.escape(o)}(?![\w-])", out)}
    assert not unknown, f"{' '.join(target)} --help does not list: {unknown}"


def test_a_command_naming_a_missing_script_fails():
    """The check above can fail: a page naming a script or module that does not exist is caught."""
    text = read("README.md") + "\n```bash\nOMP_NUM_THREADS=1 python no_such_script.py --x=1\n" \
        "torchrun --standalone --nproc_per_node=2 gone.py --y\npython -m experiments.no_such_study\n```\n"
    targets = collect({"README.md": text})
    for t in [("no_such_script.py",), ("gone.py",), ("-m", "experiments.no_such_study")]:
        assert t in targets and missing(t) is not None, t
    assert targets[("no_such_script.py",)]["x"] == {"README.md"}


def slug(heading):
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    return {slug(h) for h in re.findall(r"^#+ (.*)$", FENCE.sub("", read(page)), re.M)}


def test_every_relative_link_points_to_an_existing_file_and_heading():
    bad = []
    for page in PAGES:
        for link in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", read(page))):
            if re.match(r"^[a-z]+:", link):
                continue                       # http(s), mailto: not checked here
            path, _, anchor = link.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(os.path.join(ROOT, dest)):
                bad.append(f"{page}: {link} (no {dest})")
            elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
                bad.append(f"{page}: {link} (no heading #{anchor} in {dest})")
    assert not bad, bad


def test_every_page_of_docs_is_linked_from_the_readme():
    readme = read("README.md")
    unlinked = [p for p in PAGES[1:] if f"]({p})" not in readme and f"]({p}#" not in readme]
    assert not unlinked, unlinked
