"""`snakemake --lint` without the lints this workflow answers on purpose; exit 1 on any other.

    python tools/lint_workflow.py [WORKDIR]    # a folder with the Snakefile, rules/ and params.yaml

Accepted, each checked precisely enough that a new instance elsewhere still fails:
- "Path composition with '+'" on a line that starts with `THREADS + "`: the lint reads the OpenMP
  prefix of a shell command (`THREADS + "python -m pipeline..."`, rules/stages.smk) as a path.
- "Param <flag>_dir is a prefix of input or output file but hardcoded": a stage given a folder by a
  `-dir` flag (pipeline/snakemake_rules.py: data's --out-dir, select's --labels-dir, evaluate's
  --chunk-dir) reads or writes the files declared in it; jobs share one filesystem (docs/cluster.md).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HEADER = re.compile(r"^Lints for (?:snakefile (?P<file>.+)|rule (?P<rule>\S+) \(line \d+, (?P<rule_file>.+)\)):$")
ITEM = re.compile(r"^    \* (?P<title>.+):$")
DIR_PARAM = re.compile(r"Param \w+_dir is a prefix of input or output file but hardcoded")
PATH_COMPOSITION = re.compile(r"^Path composition with '\+' in line (?P<line>\d+)$")


def lints(output: str) -> list[tuple[str, str, str]]:
    """(snakefile or rule, title, text) of each lint in `snakemake --lint` text output."""
    found: list[tuple[str, str, str]] = []
    subject = ""
    for line in output.splitlines():
        if header := HEADER.match(line):
            subject = header["file"] or f"rule {header['rule']}"
        elif item := ITEM.match(line):
            found.append((subject, item["title"], line))
        elif found and line.startswith("      "):
            subject_, title, text = found[-1]
            found[-1] = (subject_, title, f"{text}\n{line}")
    return found


def accepted(subject: str, title: str) -> bool:
    if composition := PATH_COMPOSITION.match(title):
        lines = Path(subject).read_text().splitlines() if Path(subject).is_file() else []
        number = int(composition["line"])
        return 0 < number <= len(lines) and lines[number - 1].lstrip().startswith('THREADS + "')
    return DIR_PARAM.fullmatch(title) is not None


def main(argv: list[str]) -> int:
    workdir = Path(argv[0]) if argv else Path.cwd()
    snakemake = Path(sys.executable).parent / "snakemake"
    done = subprocess.run([str(snakemake if snakemake.exists() else "snakemake"), "--lint"], cwd=workdir,
                          capture_output=True, text=True)
    output = done.stdout + done.stderr
    found = lints(output)
    if done.returncode != 0 and not found:   # snakemake itself failed (a syntax error, a bad params.yaml)
        print(output, file=sys.stderr)
        return done.returncode
    left = [(subject, text) for subject, title, text in found if not accepted(subject, title)]
    for subject, text in left:
        print(f"{subject}:\n{text}")
    print(f"snakemake --lint: {len(left)} lint(s), {len(found) - len(left)} accepted (tools/lint_workflow.py)")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
