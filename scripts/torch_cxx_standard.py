"""Print the C++ standard (14, 17 or 20) that the installed torch's headers require.

Read from the headers themselves (``#error C++NN or later`` / ``__cplusplus < NNNNNNL`` guards in
ATen.h and c10), not from a table of torch versions, so a new torch release needs no edit here.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

_CPLUSPLUS = {"201402L": 14, "201703L": 17, "202002L": 20, "202302L": 23}
HEADERS = ("ATen/ATen.h", "c10/macros/Macros.h", "c10/util/C++17.h", "torch/extension.h")


def required_standard(include_dirs: list[str]) -> int:
    need = 14
    for inc in include_dirs:
        for rel in HEADERS:
            path = Path(inc) / rel
            if not path.is_file():
                continue
            text = path.read_text(errors="replace")
            for m in re.finditer(r"__cplusplus\s*<\s*(\d{6}L)", text):
                need = max(need, _CPLUSPLUS.get(m.group(1), need))
            for m in re.finditer(r"#\s*error\s+C\+\+(\d\d) or later", text):
                need = max(need, int(m.group(1)))
    return need


if __name__ == "__main__":
    std = required_standard([str(Path(torch.__file__).parent / "include")])
    print(std)
    sys.exit(0)
