"""rules/stages.smk, the Snakemake rules, written from the stage table of pipeline/dag.py.

    python -m pipeline.dag write rules/stages.smk    # after editing the table
    python -m pipeline.dag check rules/stages.smk    # exit 1, with a diff, when the file has drifted

Unlike dvc.yaml the rules do not depend on params: the lists a rule expands over (SHARDS, RUNS, ...) and
the functions of inputs known only when a job is planned live in rules/common.smk, which reads params.yaml
when Snakemake parses the Snakefile. From each stage of the table a rule takes its inputs (DVC's folders
become the files in them, or its job's one file where the stage runs per shard or chunk), outputs, params
keys, and a shell command with the table's flags in the table's order, so a job runs the command its DVC
stage runs, for one item.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipeline.dag import PARAMS_OK, STAGES, Dynamic, Files, FromGenerated, Stage

HEADER = """\
# Generated from the stage table in pipeline/dag.py: after editing it,
#     python -m pipeline.dag write rules/stages.smk
# (tests/test_workflow_sync.py fails when this file differs from the table). The lists the rules expand
# over and the functions they call are in rules/common.smk.
"""
# The list of rules/common.smk each axis expands over (from params.yaml).
LISTS = {"generator": "GENERATORS", "run": "RUNS", "threat": "THREATS", "learned": "LEARNED_THREATS",
         "shard": "SHARDS", "chunk": "EVAL_CHUNKS"}
INDENT = " " * 8
LINE_LENGTH = 120   # snakefmt's, pyproject.toml [tool.snakefmt]
PLACEHOLDER = re.compile(r"(?<!\$)\{(\w+)\}")
CONFIG = re.compile(r"\$\{([\w.]+)\}")


def python_text(text: str, wildcard: str = "{{{}}}") -> str:
    """A Python string literal for a path or message of the table: `{axis}` becomes `wildcard` filled with
    the axis, and `${section.key}` reads Snakemake's config (an f-string then)."""
    body = PLACEHOLDER.sub(lambda match: wildcard.format(match.group(1)), text)
    if not CONFIG.search(text):
        return f'"{body}"'
    body = body.replace("{", "{{").replace("}", "}}")
    body = re.sub(r"\$\{\{([\w.]+)\}\}", lambda match: "{" + config_lookup(match.group(1), "'") + "}", body)
    return f'f"{body}"'


def config_lookup(key: str, quote: str = '"') -> str:
    return "config" + "".join(f"[{quote}{part}{quote}]" for part in key.split("."))


def files_expression(value: Files, job_axes: tuple[str, ...]) -> str:
    """The files of a `Files` a job reads or writes: its own when the job is one item of the folder's axes,
    else every item's (`expand` over the lists of rules/common.smk), the job's wildcards kept."""
    parts = []
    for name in value.names:
        pattern = f"{value.folder}/{name}"
        assert not CONFIG.search(pattern), pattern
        listed = [axis for axis in dict.fromkeys(PLACEHOLDER.findall(pattern)) if axis not in job_axes]
        if not listed:
            parts.append(f'"{pattern}"')
            continue
        kept = [axis for axis in PLACEHOLDER.findall(pattern) if axis not in listed]
        escaped = pattern
        for axis in kept:   # the job's wildcards, escaped from expand
            escaped = escaped.replace(f"{{{axis}}}", f"{{{{{axis}}}}}")
        parts.append(f'expand("{escaped}", ' + ", ".join(f"{axis}={LISTS[axis]}" for axis in listed) + ")")
    if len(parts) == 1:
        return parts[0]
    return "[" + ", ".join(part if part.startswith('"') else f"*{part}" for part in parts) + "]"


def key_of(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


@dataclass
class Rule:
    """The directives of one rule, filled from its stage."""
    stage: Stage
    input: dict[str, str] = field(default_factory=dict)      # key -> Python expression
    output: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    shell: list[str] = field(default_factory=list)           # the parts after the module
    # the table's value (DVC's form) of each input and output -> (directive, key, Files or None)
    named: dict[str, tuple[str, str, Files | None]] = field(default_factory=dict)

    def add(self, directive: str, value: str | Files, key: str) -> None:
        table = self.input if directive == "input" else self.output
        assert key not in table, f"{self.stage.name}: two {directive}s named {key}"
        if isinstance(value, Files):
            table[key] = files_expression(value, self.stage.axes)
            self.named[value.folder] = (directive, key, value)
            if len(value.names) == 1:
                self.named[f"{value.folder}/{value.names[0]}"] = (directive, key, None)
        else:
            table[key] = python_text(value)
            self.named[value] = (directive, key, None)


def flags(stage: Stage) -> dict[str, str]:
    """The flag that passes each value of the stage's command (the key its input or output gets)."""
    found = {}
    for part in stage.cmd[1:]:
        text = part.text if isinstance(part, FromGenerated) else part
        assert isinstance(text, str)
        flag, _, value = text.partition(" ")
        found[value] = flag
    return found


def build(stage: Stage) -> Rule:
    rule, by_value = Rule(stage), flags(stage)

    def key(value: str | Files) -> str:
        """The name of an input or output: its flag's (`--out-model` names `model`, `--labels-dir` `labels`),
        else its file's."""
        paths = [value] if isinstance(value, str) else \
            [value.folder, *(f"{value.folder}/{name}" for name in value.names)]
        flag = next((by_value[path] for path in paths if path in by_value), "")
        if flag:
            name = key_of(flag).removesuffix("_dir")
            return name if name == "out" else name.removeprefix("out_")
        return re.sub(r"\W+", "_", paths[-1].rsplit("/", 1)[-1].split(".")[0])

    for dep in stage.deps:
        if dep == PARAMS_OK:   # DVC's validation stamp: Snakemake validates when it parses the Snakefile
            continue
        if isinstance(dep, Dynamic):
            rule.input[dep.name] = dep.snakemake
        elif isinstance(dep, FromGenerated):
            path = dep.text if isinstance(dep.text, str) else dep.text.folder
            pattern = dep.text if isinstance(dep.text, str) else f"{path}/{dep.text.names[0]}"
            name = key(path)
            rule.input[name] = f'run_generated("{pattern}")'
            rule.named[path] = ("input", name, None)
        else:
            rule.add("input", dep, key(dep))
    for out in (*stage.outs, *stage.metrics, *stage.plots):
        rule.add("output", out, key(out))
    if stage.params:
        rule.params["cfg"] = f'stage_params("{stage.name}")'
    for part in stage.cmd[1:]:
        rule.shell.append(shell_part(rule, part))
    if stage.launcher:
        module = str(stage.cmd[0]).split()[-1].removeprefix("pipeline.")
        rule.params["launcher"] = f'lambda wildcards, resources, threads: launcher(resources, threads, "{module}")'
    return rule


def shell_part(rule: Rule, part: str | FromGenerated) -> str:
    """One `--flag value` of the command as the rule's shell spells it."""
    if isinstance(part, FromGenerated):   # the flag and its files, or nothing for the real-data baseline
        assert isinstance(part.text, str)
        flag, _, value = part.text.partition(" ")
        _, name, _ = rule.named[value]
        rule.params[name] = f'lambda wildcards, input: flag_list("{flag}", input.{name})'
        return f"{{params.{name}}}"
    flag, _, value = part.partition(" ")
    whole = PLACEHOLDER.fullmatch(value)
    if whole and whole.group(1) in rule.stage.axes:
        return f"{flag} {{wildcards.{whole.group(1)}}}"
    if value in rule.named:
        directive, name, folder = rule.named[value]
        if folder is None or not flag.endswith("-dir"):
            return f"{flag} {{{directive}.{name}}}"
    if not PLACEHOLDER.search(value) and not CONFIG.search(value):
        return part
    name = key_of(flag)
    whole_config = CONFIG.fullmatch(value)
    rule.params[name] = config_lookup(whole_config.group(1)) if whole_config else python_text(value)
    return f"{flag} {{params.{name}}}"


def render_rule(rule: Rule) -> str:
    stage = rule.stage
    lines = [f"rule {stage.name}:"]
    if stage.message:
        lines += ["    message:", f"        {python_text(stage.message, '{{wildcards.{}}}')}"]
    for directive, entries in (("input", rule.input), ("output", rule.output), ("params", rule.params)):
        if entries:
            lines += [f"    {directive}:", *(line for key, value in entries.items() for line in entry(key, value))]
    if stage.log:
        lines += ["    log:", f"        {python_text(stage.log)},"]
    if stage.benchmark:
        benchmark = "benchmarks/" + stage.log.removeprefix("logs/").removesuffix(".log") + ".tsv"
        lines += ["    benchmark:", f"        {python_text(benchmark)}"]
    if stage.threads > 1:
        lines.append(f"    threads: {stage.threads}")
    if stage.gpu:
        lines += ["    resources:", "        gpu=1,"]
    if stage.priority:
        lines.append(f"    priority: {stage.priority}")
    if stage.local:
        lines.append("    localrule: True")
    lines += ["    conda:", '        "../envs/pipeline.yaml"', "    shell:"]
    head, command = ("", "{params.launcher}") if stage.launcher else ("THREADS + ", str(stage.cmd[0]))
    parts = [command, *(f" {part}" for part in rule.shell), " 2> {log}"]
    if len(INDENT + head + " ".join(f'"{part}"' for part in parts)) <= LINE_LENGTH:   # as snakefmt joins it
        lines.append(f'{INDENT}{head}"{"".join(parts)}"')
    else:   # one flag a line
        lines += [f'{INDENT}{head}"{parts[0]}"', *(f'{INDENT}"{part}"' for part in parts[1:])]
    return "\n".join(lines)


def entry(key: str, value: str) -> list[str]:
    """`key=value,` of a directive, a list longer than a line one item a line (as snakefmt writes it)."""
    line = f"{INDENT}{key}={value},"
    if len(line) <= LINE_LENGTH or not value.startswith("["):
        return [line]
    return [f"{INDENT}{key}=[", *(f"{INDENT}    {item}," for item in split_items(value[1:-1])), f"{INDENT}],"]


def split_items(text: str) -> list[str]:
    """The items of a list's text, split at its top-level commas."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    return [*items, text[start:].strip()]


def render() -> str:
    """rules/stages.smk's text: every stage of the table Snakemake runs, in the table's order."""
    rules = [render_rule(build(stage)) for stage in STAGES.values() if stage.snakemake]
    return HEADER + "\n\n" + "\n\n\n".join(rules) + "\n"
