"""The README and docs/ can be followed as written: every `bash X.sh ...` and `python X.py ...` command they show
names a script that exists and passes only flags that script's --help lists, and every relative link points to a
file (and heading) that exists."""
import contextlib
import functools
import glob
import io
import os
import re
import runpy
import shlex
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
WRAPPERS = {"srun", "time", "exec", "env"}  # words that run the command after them
FLAG = re.compile(r"--[A-Za-z][\w-]*")
FENCED = re.compile(r"^```[^\n]*\n(.*?)^```", flags=re.S | re.M)
# bench/benchmark.py and bench/profile_stage1.py hand every flag they do not know to main.py (their --help says so)
ALSO_MAIN_FLAGS = {"bench/benchmark.py", "bench/profile_stage1.py"}


def read(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def code_texts(markdown):
    """The text of every fenced code block, and every inline code span of the prose around them."""
    fenced = FENCED.findall(markdown)
    prose = FENCED.sub("", markdown)
    inline = re.findall(r"`([^`]+)`", prose)
    return fenced + [" ".join(span.split()) for span in inline]


def commands(text):
    """Each simple command of a shell text as a list of words (continuation lines joined, comments dropped,
    split at ;, &&, || and |)."""
    text = text.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split = True
        try:
            words = list(lexer)
        except ValueError:  # an unbalanced quote: not a shell line
            continue
        current = []
        for word in words + [";"]:
            if word and set(word) <= set(";&|()"):
                if current:
                    found.append(current)
                current = []
            else:
                current.append(word)
    return found


def script_call(words):
    """(kind, script, arguments) of a `bash X.sh ...` or `python [-m module ...] X.py ...` command, else None."""
    while words and ("=" in words[0] and not words[0].startswith("-") or words[0] in WRAPPERS):
        words = words[1:]  # NAME=value prefixes and wrappers such as srun
    if words[:1] == ["nice"]:
        words = words[3:] if words[1:2] == ["-n"] else words[1:]
    if len(words) < 2:
        return None
    if words[0] == "bash":
        return "sh", words[1], words[2:]
    if words[0] in ("python", "python3"):
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        if scripts:  # python -m torch.distributed.run ... main.py ...: torchrun's own flags come first
            return "py", words[scripts[0]], words[scripts[0] + 1:]
    return None


def documented_calls():
    calls = []
    for doc in DOCS:
        for text in code_texts(read(doc)):
            for words in commands(text):
                call = script_call(words)
                if call:
                    calls.append((doc, " ".join(words), *call))
    return calls


def run_help(script, *args):
    """What `python SCRIPT ARGS --help` prints, run in this process (the modules it imports are loaded already,
    so each script costs milliseconds, not a fresh interpreter's seconds)."""
    printed = io.StringIO()
    saved_argv = sys.argv
    sys.argv = [script, *args, "--help"]
    try:
        with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exited:
            runpy.run_path(os.path.join(REPO, script), run_name="__main__")
    finally:
        sys.argv = saved_argv
    assert exited.value.code in (0, None), f"{script} {' '.join(args)} --help exited with {exited.value.code}"
    return printed.getvalue()


@functools.lru_cache(maxsize=None)
def python_flags(script, subcommand=None):
    """The flags `python SCRIPT [SUBCOMMAND] --help` lists."""
    flags = set(FLAG.findall(run_help(script, *([subcommand] if subcommand else []))))
    if script in ALSO_MAIN_FLAGS:
        flags |= python_flags("main.py")
    return flags


@functools.lru_cache(maxsize=None)
def shell_flags(script):
    """A wrapper's own options (its `case` patterns such as `--full)`) and, when it runs main.py, main.py's."""
    source = read(script)
    flags = set(re.findall(r"^\s*(--[A-Za-z][\w-]*)\)", source, flags=re.M))
    if "main.py" in source or "MAIN[@]" in source:
        flags |= python_flags("main.py")
    return flags


def unknown_flags(kind, script, arguments):
    typed = {FLAG.match(word).group(0) for word in arguments if FLAG.match(word)}
    if kind == "sh":
        if script == "run_tests.sh":  # its arguments are pytest's
            return set()
        return typed - shell_flags(script)
    first = arguments[0] if arguments else ""
    subcommand = first if re.fullmatch(r"[a-z_]+", first) else None  # prepare_data.py nifti|kaggle|csv
    return typed - python_flags(script, subcommand)


CALLS = documented_calls()


def test_the_docs_show_commands_to_check():
    scripts = {script for _, _, _, script, _ in CALLS}
    assert {"demo.sh", "train.sh", "score.sh", "main.py", "prepare_data.py", "bench/benchmark.py"} <= scripts


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_names_a_script_that_exists_and_flags_its_help_lists(doc):
    problems = []
    for where, command, kind, script, arguments in CALLS:
        if where != doc:
            continue
        if not os.path.isfile(os.path.join(REPO, script)):
            problems.append(f"{command!r}: no file {script}")
            continue
        unknown = unknown_flags(kind, script, arguments)
        if unknown:
            problems.append(f"{command!r}: {script} --help lists no {', '.join(sorted(unknown))}")
    assert not problems, f"{doc}:\n" + "\n".join(problems)


def heading_anchors(markdown):
    """GitHub's anchors of a document's headings: lower case, punctuation dropped, spaces to hyphens."""
    prose = FENCED.sub("", markdown)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
            for title in re.findall(r"^#{1,6} (.+)$", prose, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_points_to_a_file_and_heading_that_exist(doc):
    markdown = read(doc)
    targets = re.findall(r"\]\(([^)\s]+)\)", markdown) + re.findall(r'src="([^"]+)"', markdown)
    problems = []
    for target in targets:
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not os.path.exists(os.path.join(REPO, file)):
            problems.append(f"{target}: no file {file}")
        elif anchor and file.endswith(".md") and anchor not in heading_anchors(read(file)):
            problems.append(f"{target}: {file} has no heading with the anchor #{anchor}")
    assert not problems, f"{doc}:\n" + "\n".join(problems)
