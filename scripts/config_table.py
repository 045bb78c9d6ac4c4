"""Rewrites the README's config reference from the TrainConfig dataclass (run after adding options)."""
import dataclasses
import os
import re

from fasthint.config import TrainConfig

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def table() -> str:
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        rows.append(f"| `--{f.name}` | `{f.default!r}` | {f.metadata['help'].replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    text = open(README).read()
    text = re.sub(r"(<!-- config-table:[^\n]*-->\n).*?(\n<!-- /config-table -->)",
                  lambda m: m.group(1) + table() + m.group(2), text, flags=re.S)
    open(README, "w").write(text)
