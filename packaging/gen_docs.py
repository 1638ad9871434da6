"""Write jobtoken's man page and bash completion from its argparse parser (build time).

Generated, so that every subcommand and option the CLI has is documented and completed,
and nothing the CLI lacks. Usage: gen_docs.py man OUT | bash-completion OUT |
wrapper-man SCRIPT OUT (jobtoken-wrap(1) from the script's header comment).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Dict, List

from jobtoken import __version__
from jobtoken.cli import EXIT_CODES_HELP, build_parser


def _subcommands(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _helps(parser: argparse.ArgumentParser) -> Dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def _options(parser: argparse.ArgumentParser) -> List[str]:
    return sorted({s for a in parser._actions for s in a.option_strings})


def _roff(text: str) -> str:
    lines = []
    for line in text.replace("\\", "\\e").splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines).replace("-", "\\-")


def man_page() -> str:
    parser = build_parser()
    subs = _subcommands(parser)
    helps = _helps(parser)
    epoch = os.environ.get("SOURCE_DATE_EPOCH")  # reproducible builds set it
    when = datetime.datetime.fromtimestamp(
        int(epoch) if epoch else datetime.datetime.now().timestamp(), tz=datetime.timezone.utc
    )
    date = when.strftime("%Y-%m-%d")
    out = [
        f'.TH JOBTOKEN 1 "{date}" "jobtoken {__version__}" "User Commands"',
        ".SH NAME",
        "jobtoken \\- keep WLCG bearer tokens alive inside grid batch jobs, from a Mytoken",
        ".SH SYNOPSIS",
        ".B jobtoken",
        "[\\fB\\-\\-version\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fB\\-\\-\\fR \\fICMD\\fR...]",
        ".SH DESCRIPTION",
        _roff(parser.description or ""),
        "Every command takes \\fB\\-\\-help\\fR for its full options.",
        ".SH COMMANDS",
    ]
    for name, sub in subs.items():
        out += [".TP", f".B {_roff(name)}", _roff(helps.get(name, ""))]
        if sub.description:
            out += [".IP", _roff(sub.description)]
        nested = _subcommands(sub)
        if nested:
            out += [".IP", "Subcommands: " + ", ".join(f"\\fB{_roff(n)}\\fR" for n in nested)]
        opts = _options(sub)
        if opts:
            out += [".IP", "Options: " + ", ".join(f"\\fB{_roff(o)}\\fR" for o in opts)]
    out += [
        ".SH EXIT STATUS",
        ".nf",
        _roff(EXIT_CODES_HELP.split("\n", 1)[1]),
        ".fi",
        ".SH FILES",
        ".TP",
        ".B /etc/jobtoken/jobtoken.toml",
        "site configuration ($JOBTOKEN_CONFIG overrides the path)",
        ".TP",
        ".B /usr/libexec/jobtoken/",
        "HTCondor hooks, job wrapper, credential storer and credmon",
        ".TP",
        ".B /usr/share/jobtoken/condor/config.d/",
        "HTCondor configuration snippets to copy into /etc/condor/config.d",
        ".SH SEE ALSO",
        "/usr/share/doc/jobtoken/",
        "",
    ]
    return "\n".join(out)


def wrapper_man_page(script: str) -> str:
    """jobtoken-wrap(1) from the header comment of the script, which is its documentation."""
    with open(script, encoding="utf-8") as source:
        lines = source.read().splitlines()[1:]
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line[2:] if line.startswith("# ") else line[1:])
    name, _, summary = header[0].partition(": ")
    return "\n".join([
        f'.TH {name.upper()} 1 "" "jobtoken {__version__}" "User Commands"',
        ".SH NAME",
        f"{_roff(name)} \\- {_roff(summary)}",
        ".SH DESCRIPTION",
        ".nf",
        _roff("\n".join(header[1:]).strip("\n")),
        ".fi",
        ".SH SEE ALSO",
        "jobtoken(1)",
        "",
    ])


def bash_completion() -> str:
    parser = build_parser()
    subs = _subcommands(parser)
    cases = "\n".join(
        f"        {name}) opts='{' '.join(_options(sub))}' ;;" for name, sub in subs.items()
    )
    return f"""# bash completion for jobtoken (generated from its argument parser)
_jobtoken() {{
    local cur cmd opts i
    cur=${{COMP_WORDS[COMP_CWORD]}}
    cmd=
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${{COMP_WORDS[i]}} in
            --) return 0 ;;
            -*) ;;
            *) cmd=${{COMP_WORDS[i]}}; break ;;
        esac
    done
    if [[ -z $cmd ]]; then
        COMPREPLY=($(compgen -W '{' '.join(subs)} --help --version' -- "$cur"))
        return 0
    fi
    case $cmd in
{cases}
        *) opts= ;;
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -F _jobtoken jobtoken
"""


def main(argv: List[str]) -> int:
    kinds = {"man": man_page, "bash-completion": bash_completion}
    if len(argv) == 3 and argv[0] == "wrapper-man":
        text = wrapper_man_page(argv[1])
    elif len(argv) == 2 and argv[0] in kinds:
        text = kinds[argv[0]]()
    else:
        sys.stderr.write("usage: gen_docs.py man|bash-completion OUT | wrapper-man SCRIPT OUT\n")
        return 2
    with open(argv[-1], "w", encoding="utf-8") as out:
        out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
