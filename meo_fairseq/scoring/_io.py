"""Small file helpers shared by the scorer command lines."""

import json
import os
from typing import List


def read_lines(path: str) -> List[str]:
    """Lines of a UTF-8 text file, split at ``\\n`` only, without the ``\\n`` (or ``\\r\\n``)."""
    out = []
    with open(path, encoding="utf-8", newline="\n") as f:
        for line in f:
            if line.endswith("\n"):
                line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
            out.append(line)
    return out


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
