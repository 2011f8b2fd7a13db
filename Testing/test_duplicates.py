"""No block of more than six lines is repeated anywhere in MedLoRALib (one place for each fact).

Lines are compared after normalising: surrounding whitespace and comments removed; blank lines,
docstrings, import statements and trivial lines (closing brackets, ``else:``, ``try:``, ``pass``...)
dropped. Every window of seven consecutive remaining lines is hashed across all files; a hash
seen twice is a copied block. Overlapping windows are merged, so each copy is reported once as
``file:first-last`` pairs.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "MedLoRALib"
WINDOW = 7  # more than six lines
TRIVIAL = re.compile(r"^(?:[)\]}:,]*|else:|try:|finally:|pass|return|continue|break|raise|\*|/|\.\.\.)$")


def normalised_lines(source: str) -> list[tuple[int, str]]:
    """(line number, normalised text) of the lines that carry code worth comparing."""
    tree = ast.parse(source)
    dropped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            dropped.update(range(node.lineno, node.end_lineno + 1))
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            dropped.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            lines[row - 1] = lines[row - 1][:col]
    kept = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if text and number not in dropped and not TRIVIAL.match(text):
            kept.append((number, text))
    return kept


def find_duplicates(files: dict[str, str], window: int = WINDOW) -> list[tuple[str, int, int, str, int, int]]:
    """Copied blocks as (file_a, first_line, last_line, file_b, first_line, last_line)."""
    lines = {name: normalised_lines(source) for name, source in files.items()}
    seen: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)
    for name, kept in lines.items():
        texts = [text for _, text in kept]
        for start in range(len(texts) - window + 1):
            seen[tuple(texts[start:start + window])].append((name, start))
    pairs = set()
    for places in seen.values():
        for i, (file_a, a) in enumerate(places):
            for file_b, b in places[i + 1:]:
                pairs.add((file_a, a, file_b, b))
    blocks = []
    for file_a, a, file_b, b in sorted(pairs):
        if (file_a, a - 1, file_b, b - 1) in pairs:
            continue  # inside a block that starts earlier
        extra = 0
        while (file_a, a + extra + 1, file_b, b + extra + 1) in pairs:
            extra += 1
        last = window - 1 + extra
        blocks.append((file_a, lines[file_a][a][0], lines[file_a][a + last][0],
                       file_b, lines[file_b][b][0], lines[file_b][b + last][0]))
    return blocks


def test_no_block_of_more_than_six_lines_is_repeated_in_the_library():
    files = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8") for path in sorted(LIB.rglob("*.py"))}
    blocks = find_duplicates(files)
    report = [f"{fa}:{a1}-{a2} == {fb}:{b1}-{b2}" for fa, a1, a2, fb, b1, b2 in blocks]
    assert not blocks, f"{len(blocks)} repeated blocks (> {WINDOW - 1} lines); keep one and call it:\n" + "\n".join(report)


def test_the_checker_finds_a_copy_despite_comments_and_indentation_and_ignores_imports():
    body = "\n".join(f"    total += value * {n}" for n in range(7))
    one = f'"""Doc."""\nimport os\n\n\ndef first(value):\n    """Why."""\n    total = 0\n{body}\n    return total\n'
    other = ("import os\nimport sys\n\n\nclass Holder:\n    def second(self, value):\n        total = 0  # start\n"
             + "\n".join(f"        # step {n}\n        total += value * {n}" for n in range(7)) + "\n")
    blocks = find_duplicates({"a.py": one, "b.py": other})
    assert blocks == [("a.py", 7, 14, "b.py", 7, 21)]
    assert find_duplicates({"a.py": one, "b.py": one.replace("* 3", "* 9")}) == []  # six equal lines are fine
    assert find_duplicates({"a.py": "import os\nimport sys\n" * 8, "b.py": "import os\nimport sys\n" * 8}) == []
