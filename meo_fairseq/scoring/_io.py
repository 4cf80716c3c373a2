"""Small file helpers shared by the scorer command lines."""

import json
import os
from typing import List


def read_lines(path: str) -> List[str]:
    """Lines of a UTF-8 text file, split at ``\\n`` only, without the ``\\n`` (or ``\\r\\n``).

    Raises:
        ValueError: naming the file and line, for text that is not UTF-8 (a bare
            UnicodeDecodeError would not name the file).
    """
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
                ) from None
            if line.endswith("\n"):
                line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
            out.append(line)
    return out


def read_text(path: str, encoding: str = "utf-8") -> str:
    """The whole file as text; a file that is not UTF-8 raises ValueError naming it."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        lineno = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {data[e.start]:#04x})") from None


def write_json(path: str, obj) -> None:
    """Write ``obj`` as indented JSON (via a temporary file, so a half-written file never stays)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def report(scores, out_path=None) -> int:
    """Print the scores as JSON, write them to ``out_path`` if given; the CLI's exit code (0)."""
    print(json.dumps(scores, indent=2, sort_keys=True))
    if out_path:
        write_json(out_path, scores)
    return 0
