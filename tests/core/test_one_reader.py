"""One checkpoint reader, one validator, one FP8 table (issue 17): checked on the source itself."""

from __future__ import annotations

import re
from pathlib import Path

PKG = Path(__file__).parents[2] / "dsv3"


def sources() -> dict[str, str]:
    return {str(p.relative_to(PKG)): p.read_text() for p in PKG.rglob("*.py")}


def test_one_safetensors_header_parser_and_one_index_reader():
    header = [f for f, s in sources().items() if '"<Q"' in s]
    assert header == ["core/safetensors_io.py"], header
    index = [f for f, s in sources().items() if re.search(r'"model\.safetensors\.index\.json"', s)]
    assert index == ["core/checkpoint.py"], index


def test_fp8_facts_in_one_module_and_no_backend_imports_convert():
    for f, s in sources().items():
        if f != "core/fp8.py":
            assert not re.search(r"\b(448|240)\.0\b", s), f"{f} writes an FP8 max value itself"
            assert "0x80 ->" not in s and "def fn_to_fnuz" not in s, f"{f} holds fn<->fnuz mapping"
        if f.startswith("backends/"):
            assert "convert" not in re.findall(r"from \.+(\w+)", s), f"{f} imports dsv3.convert"
