"""Rewrites the config reference in docs/CONFIG.md (between its `<!-- config-table: ... -->` and
`<!-- /config-table -->` markers) and the option list of fasthint/precheck.py (between its
`# <options>` and `# </options>` lines) from the component configs of TrainConfig (run after adding
options)."""
import os
import re

from fasthint.config import TrainConfig, _field_type, field_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DOC = os.path.join(REPO, "docs", "CONFIG.md")
PRECHECK = os.path.join(REPO, "fasthint", "precheck.py")


def table() -> str:
    out = []
    for title, fields in field_groups(TrainConfig):
        rows = [f"**{title}**", "", "| option | default | meaning |", "|---|---|---|"]
        for f in fields:
            rows.append(f"| `--{f.name}` | `{f.default!r}` | {f.metadata['help'].replace('|', '/')} |")
        out.append("\n".join(rows))
    return "\n\n".join(out)


def option_types() -> str:
    """``OPTION_TYPES`` of fasthint/precheck.py: every flag's name and type, in ``--help`` order."""
    items = [f'"{f.name}": {_field_type(f).__name__},' for _, fields in field_groups(TrainConfig) for f in fields]
    lines = [""]
    for item in items:  # whole items per line, at most 120 columns
        if lines[-1] and len(lines[-1]) + 1 + len(item) > 116:
            lines.append("")
        lines[-1] += (" " if lines[-1] else "") + item
    return "OPTION_TYPES: dict[str, type] = {\n" + "\n".join("    " + line for line in lines) + "\n}"


def _rewrite(path: str, pattern: str, new: str) -> None:
    text = open(path).read()
    text, found = re.subn(pattern, lambda m: m.group(1) + new + m.group(2), text, flags=re.S)
    if not found:
        raise SystemExit(f"{path} has no markers matching {pattern!r}")
    open(path, "w").write(text)


if __name__ == "__main__":
    _rewrite(CONFIG_DOC, r"(<!-- config-table:[^\n]*-->\n).*?(\n<!-- /config-table -->)", table())
    _rewrite(PRECHECK, r"(# <options>[^\n]*\n).*?(\n# </options>)", option_types())
