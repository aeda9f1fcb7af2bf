"""JSON files of the data (pre-training corpus, answer table, store index) read with errors that
name the file and the line: an empty or truncated file otherwise surfaces as a bare
``JSONDecodeError`` with no path."""

from __future__ import annotations

import json
import os


def read_json(path: str | os.PathLike) -> object:
    """``json.load`` of ``path``; an empty, truncated or non-UTF-8 file raises ValueError naming it."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        what = "empty file" if not exc.doc.strip() else f"line {exc.lineno} column {exc.colno}: {exc.msg}"
        raise ValueError(f"{path}: not valid JSON ({what}); truncated or not JSON?") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 JSON file ({exc})") from exc
