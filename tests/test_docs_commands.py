"""The docs cannot rot: every `dtr-scale ...` command shown in README.md and docs/*.md names a real subcommand,
every `--flag` in it is an option of that subcommand's real argparse parser (and a value shown for a flag with
choices is one of them), every `key=value` override in it and every config key named in the docs (`train.lr`,
`mtl.method=uw`, a YAML block) is a key of the config schema; every `python bench/NAME.py --flag` shown there and
in bench/RESULTS.md is an option of that benchmark's parser. The last tests show the check fails when a flag or a
key is renamed, in the docs or in a parser."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import io
import re
import shlex
import sys
from pathlib import Path

import yaml

from dtr_scale.cli import SUBCOMMANDS
from dtr_scale.config import RunConfig
from dtr_scale.config_docs import config_fields

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
# `dtr-scale SUB`, `python -m dtr_scale SUB`, `deepspeed ... --module dtr_scale SUB`
COMMAND = re.compile(r"(?:\bdtr-scale|(?:-m|--module)\s+dtr_scale)\s+(?=[a-z])")
SECTIONS = {f.name for f in dataclasses.fields(RunConfig)}
FILE_SUFFIXES = (
    "json",
    "jsonl",
    "yaml",
    "yml",
    "py",
    "md",
    "npz",
    "npy",
    "pt",
    "png",
    "safetensors",
    "sh",
    "txt",
)


def _commands(text: str) -> list[str]:
    """The dtr-scale command lines of a markdown text: in fenced blocks (with `\\` continuations joined) and in
    inline code spans; each string starts at the subcommand."""
    pieces = []
    for _, body in FENCE.findall(text):
        pieces += body.replace("\\\n", " ").splitlines()
    pieces += INLINE.findall(FENCE.sub("", text))
    found = []
    for piece in pieces:
        starts = [m.end() for m in COMMAND.finditer(piece)]
        found += [piece[start:end] for start, end in zip(starts, [*starts[1:], None])]
    return found


@functools.cache
def _parser(subcommand: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"dtr-scale {subcommand}")
    importlib.import_module(SUBCOMMANDS[subcommand][0]).add_arguments(parser)
    return parser


def _tokens(command: str) -> list[str]:
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError:  # an unbalanced quote in prose
        tokens = command.split()
    return [t.strip("[]") for t in tokens if t.strip("[]")]


def command_problems(command: str, parser_for=_parser) -> list[str]:
    """What is wrong with one documented command (empty when it matches the CLI)."""
    subcommand, *args = _tokens(command)
    if subcommand not in SUBCOMMANDS:
        return [f"{command!r}: no subcommand {subcommand!r}"]
    parser = parser_for(subcommand)
    module = importlib.import_module(SUBCOMMANDS[subcommand][0])
    options = parser._option_string_actions  # the parser's own table of option strings
    problems = []
    for i, token in enumerate(args):
        if token.startswith("--"):
            flag, _, inline_value = token.partition("=")
            action = options.get(flag)
            if action is None:
                problems.append(f"{command!r}: dtr-scale {subcommand} has no option {flag}")
                continue
            value = inline_value or (args[i + 1] if i + 1 < len(args) else "")
            if action.choices and re.fullmatch(r"[a-z0-9_|.-]+", value):
                bad = [v for v in value.split("|") if v not in map(str, action.choices)]
                problems += [f"{command!r}: {flag} {v} is not one of {list(action.choices)}" for v in bad]
        elif re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)*=.*", token) and "/" not in token.split("=")[0]:
            if not getattr(module, "accepts_overrides", False):
                problems.append(f"{command!r}: dtr-scale {subcommand} takes no key=value overrides")
            problems += key_problems(token.split("=", 1)[0], command)
    return problems


def key_problems(key: str, where: str) -> list[str]:
    known = config_fields()
    if key in known or key in SECTIONS:
        return []
    return [f"{where!r}: {key} is not a config key (dtr_scale/config/schema.py)"]


def _named_keys(text: str) -> list[tuple[str, str]]:
    """(key, the span it came from) for config keys named in inline code and in fenced YAML blocks."""
    keys = []
    for span in INLINE.findall(FENCE.sub("", text)):
        m = re.fullmatch(r"([a-z_0-9]+)\.([a-z_0-9]+)(?:\s*[=:].*)?", span.strip())
        if m and m.group(1) in SECTIONS and m.group(2) not in FILE_SUFFIXES:
            keys.append((f"{m.group(1)}.{m.group(2)}", span))
    for language, body in FENCE.findall(text):
        if language == "yaml":
            for section, values in (yaml.safe_load(body) or {}).items():
                keys += [(f"{section}.{name}", f"yaml block: {section}") for name in (values or {})]
    return keys


def doc_problems(text: str, parser_for=_parser) -> list[str]:
    problems = [p for command in _commands(text) for p in command_problems(command, parser_for)]
    return problems + [p for key, span in _named_keys(text) for p in key_problems(key, span)]


BENCH_COMMAND = re.compile(r"\bpython3? bench/([a-z_]+)\.py\b")


@functools.cache
def bench_options(script: str) -> frozenset[str]:
    """The option strings of `python bench/SCRIPT.py`, read from its own parser's --help."""
    sys.path.insert(0, str(REPO / "bench"))
    module = importlib.import_module(script)
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        module.parse_args(["--help"])
    options = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", text.getvalue()))
    if script == "step_time":  # `--repa` hands the rest to bench/repa_step_time.py
        options |= {"--repa"} | bench_options("repa_step_time")
    return frozenset(options)


def bench_problems(text: str) -> list[str]:
    """Flags of the `python bench/NAME.py ...` commands in a markdown text that the script does not have."""
    pieces = [line for _, body in FENCE.findall(text) for line in body.replace("\\\n", " ").splitlines()]
    pieces += INLINE.findall(FENCE.sub("", text))
    problems = []
    for piece in pieces:
        for match in BENCH_COMMAND.finditer(piece):
            for token in _tokens(piece[match.end() :].split(" python ")[0]):
                if token == "--":  # argparse's end of options: key=value overrides follow
                    break
                flag = token.partition("=")[0]
                if flag.startswith("--") and flag not in bench_options(match.group(1)):
                    problems.append(f"{piece.strip()!r}: bench/{match.group(1)}.py has no option {flag}")
    return problems


def test_the_docs_show_commands_and_keys_to_check():
    text = "\n".join(path.read_text() for path in DOCS)
    commands = _commands(text)
    subcommands = {_tokens(c)[0] for c in commands}
    # the job end to end is shown, each stage at least once
    assert {
        "preprocess",
        "train",
        "convert",
        "sample",
        "evaluate",
        "prepare-builtin",
        "cluster",
    } <= subcommands
    assert len(_named_keys(text)) > 50


def test_every_documented_command_flag_and_key_exists():
    problems = {path.name: doc_problems(path.read_text()) for path in DOCS}
    assert {name: p for name, p in problems.items() if p} == {}


def test_every_documented_benchmark_flag_exists():
    docs = [*DOCS, REPO / "bench/RESULTS.md"]
    text = "\n".join(path.read_text() for path in docs)
    assert len({m.group(1) for m in BENCH_COMMAND.finditer(text)}) >= 6  # the benchmarks are shown
    assert {path.name: p for path in docs if (p := bench_problems(path.read_text()))} == {}
    renamed = bench_problems("`python bench/zero.py --hidden 64 --worldsize 2`")
    assert renamed == [
        "'python bench/zero.py --hidden 64 --worldsize 2': bench/zero.py has no option --worldsize"
    ]


def test_a_renamed_flag_in_the_docs_is_caught():
    readme = (REPO / "README.md").read_text()
    assert "--dry-run" in readme
    problems = doc_problems(readme.replace("--dry-run", "--dry-runs"))
    assert any("dtr-scale train has no option --dry-runs" in p for p in problems), problems


def test_a_flag_renamed_in_the_parser_is_caught():
    def renamed(subcommand: str) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser()
        importlib.import_module(SUBCOMMANDS[subcommand][0]).add_arguments(parser)
        if subcommand == "sample":  # a copy of the real parser with --num-samples renamed
            action = parser._option_string_actions.pop("--num-samples")
            action.option_strings = ["--count"]
            parser._option_string_actions["--count"] = action
        return parser

    problems = doc_problems((REPO / "README.md").read_text(), parser_for=renamed)
    assert any("dtr-scale sample has no option --num-samples" in p for p in problems), problems


def test_a_renamed_choice_or_config_key_is_caught():
    problems = doc_problems(
        "```bash\ndtr-scale sample --model m --out o --sampler ddpn train.max_stepz=3\n```\n"
        "and `dtr-scale train --config c.yaml train.max_stepz=3`; set `mtl.methods: uw`.\n"
    )
    assert any("--sampler ddpn is not one of" in p for p in problems), problems
    assert any("dtr-scale sample takes no key=value overrides" in p for p in problems), problems
    assert sum("train.max_stepz is not a config key" in p for p in problems) == 2, problems
    assert any("mtl.methods is not a config key" in p for p in problems), problems
