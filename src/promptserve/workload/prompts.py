"""Prompt sources: a text file (one prompt a line) or a TSV/CSV with a ``Prompt`` column."""

from __future__ import annotations

import csv
from pathlib import Path

from promptserve.errors import InputError

MAX_PROMPT_CHARS = 4000


def load_prompts(path: str | Path) -> list[str]:
    """Prompts in file order; blank lines are skipped (they are not prompts)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompts file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"prompts file {str(path)!r} is not UTF-8 text ({exc.reason})") from None
    if path.suffix.lower() in {".tsv", ".csv"}:
        prompts = _column_prompts(path, text, "\t" if path.suffix.lower() == ".tsv" else ",")
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise InputError(f"prompts file {str(path)!r} holds no prompts")
    for i, prompt in enumerate(prompts):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(
                f"prompts file {str(path)!r}: prompt {i + 1} has {len(prompt)} characters "
                f"(the limit is {MAX_PROMPT_CHARS})"
            )
    return prompts


def _column_prompts(path: Path, text: str, delimiter: str) -> list[str]:
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    columns = reader.fieldnames or []
    if "Prompt" not in columns:
        raise InputError(
            f"prompts file {str(path)!r} has no 'Prompt' column (columns: {', '.join(columns)})"
        )
    return [(row["Prompt"] or "").strip() for row in reader]
