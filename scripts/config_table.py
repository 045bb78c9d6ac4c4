"""Rewrites the config reference in docs/CONFIG.md (between its `<!-- config-table: ... -->` and
`<!-- /config-table -->` markers) from the component configs of TrainConfig (run after adding options)."""
import os
import re

from fasthint.config import TrainConfig, field_groups

CONFIG_DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "CONFIG.md")


def table() -> str:
    out = []
    for title, fields in field_groups(TrainConfig):
        rows = [f"**{title}**", "", "| option | default | meaning |", "|---|---|---|"]
        for f in fields:
            rows.append(f"| `--{f.name}` | `{f.default!r}` | {f.metadata['help'].replace('|', '/')} |")
        out.append("\n".join(rows))
    return "\n\n".join(out)


if __name__ == "__main__":
    text = open(CONFIG_DOC).read()
    text, found = re.subn(r"(<!-- config-table:[^\n]*-->\n).*?(\n<!-- /config-table -->)",
                          lambda m: m.group(1) + table() + m.group(2), text, flags=re.S)
    if not found:
        raise SystemExit(f"{CONFIG_DOC} has no <!-- config-table: ... --> ... <!-- /config-table --> markers")
    open(CONFIG_DOC, "w").write(text)
