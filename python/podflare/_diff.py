"""`diff` compares the files of two sandboxes (the TypeScript SDK's diff.ts mirrors this).

Each sandbox lists its files with a small walker run as its own python3 process (through
bash, so the REPL's globals, cwd and imports are untouched); the listings are compared here.
"""
import json
from typing import Dict, Iterable, List

from .errors import InvalidArgumentError

DEFAULT_DIFF_PATHS = ["/root", "/tmp"]


def listing_command(paths: Iterable[str]) -> str:
    paths = list(paths)
    for p in paths:
        if not p.startswith("/") or "\0" in p:
            raise InvalidArgumentError(f"diff paths must be absolute, got {p!r}")
    return (
        "python3 - <<'PODFLARE_DIFF_EOF'\n"
        "import hashlib, json, os, stat\n"
        "out = {}\n"
        f"for root in {json.dumps(paths, separators=(',', ':'))}:\n"
        "    for dirpath, dirnames, filenames in os.walk(root):\n"
        "        dirnames.sort()\n"
        "        for name in filenames:\n"
        "            path = os.path.join(dirpath, name)\n"
        "            try:\n"
        "                st = os.lstat(path)\n"
        "                if stat.S_ISLNK(st.st_mode):\n"
        '                    out[path] = "link:" + os.readlink(path)\n'
        "                elif stat.S_ISREG(st.st_mode):\n"
        "                    digest = hashlib.sha256()\n"
        '                    with open(path, "rb") as f:\n'
        '                        for block in iter(lambda: f.read(1 << 20), b""):\n'
        "                            digest.update(block)\n"
        "                    out[path] = digest.hexdigest()\n"
        "            except OSError:\n"
        "                pass\n"
        "print(json.dumps(out))\n"
        "PODFLARE_DIFF_EOF"
    )


def compare_listings(mine: Dict[str, str], theirs: Dict[str, str]) -> Dict[str, List[str]]:
    return {
        "added": sorted(p for p in theirs if p not in mine),
        "removed": sorted(p for p in mine if p not in theirs),
        "modified": sorted(p for p in mine if p in theirs and mine[p] != theirs[p]),
    }
