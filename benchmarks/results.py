"""Write a benchmark's table into RESULTS.md, replacing the previous section of the same title."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEach section is written by the command it names; rerun it to refresh.\n"


def append_section(title: str, command: str, body: str) -> None:
    text = RESULTS.read_text() if RESULTS.is_file() else HEADER
    stamp = datetime.date.today().isoformat()
    section = f"## {title}\n\nCommand: `{command}` ({stamp})\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    RESULTS.write_text(text.rstrip() + "\n")
