#!/usr/bin/env python3
"""The layering of dpo_dist as a check (ctest: check_layers, label unit).

Arrows point one way (docs/architecture.md):

    launch -> core, data, dist, runtime, util
    runtime -> util            (threads, tensor cache, libtorch's CUDA half)
    core, data, dist -> util   (and never each other)
    util -> nothing

Every `#include "folder/..."` of a product file is checked against that table; a file that
includes a folder its own folder may not see is named with its line, and the check fails.
Tests, benchmarks and fuzz harnesses (tests/) may include anything.

  python3 scripts/checks/layers.py [SOURCE_DIR]
"""
import os
import re
import sys

ALLOWED = {
    "util": {"util"},
    "core": {"core", "util"},
    "data": {"data", "util"},
    "dist": {"dist", "util"},
    "runtime": {"runtime", "util"},
    "launch": {"launch", "core", "data", "dist", "runtime", "util"},
}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([A-Za-z0-9_]+)/')
SOURCES = (".h", ".hpp", ".cpp", ".cc", ".cu", ".cuh")


def main():
    root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", ".."))
    bad, files = [], 0
    for layer, allowed in ALLOWED.items():
        for dirpath, _, names in os.walk(os.path.join(root, layer)):
            for name in sorted(names):
                if not name.endswith(SOURCES):
                    continue
                path = os.path.join(dirpath, name)
                files += 1
                with open(path, encoding="utf-8", errors="replace") as f:
                    for lineno, line in enumerate(f, 1):
                        m = INCLUDE.match(line)
                        if m and m.group(1) in ALLOWED and m.group(1) not in allowed:
                            bad.append(f"{os.path.relpath(path, root)}:{lineno}: {layer}/ may not include "
                                       f"{m.group(1)}/ (allowed: {', '.join(sorted(allowed))})")
    for b in bad:
        print(b)
    print(f"layers: {files} files checked, {len(bad)} include(s) against the layering")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
