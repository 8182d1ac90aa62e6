"""Run by test_newcomer.py under ``torchrun``: the STL-10 recipe, then one JSON per rank with what it returned and
which files under ``--output_dir`` this process opened for writing (an audit hook sees every ``open``)."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))

written: list[str] = []


def record_writes(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR):
        if isinstance(args[0], str | bytes | os.PathLike):
            written.append(os.path.abspath(os.fsdecode(args[0])))


if __name__ == "__main__":
    report_dir, argv = sys.argv[1], sys.argv[2:]
    output_dir = os.path.abspath(argv[argv.index("--output_dir") + 1])
    sys.addaudithook(record_writes)
    from stl10 import main

    results = main(argv)
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as handle:
        files = sorted({os.path.relpath(path, output_dir) for path in written if path.startswith(output_dir + os.sep)})
        json.dump({"results": results, "written": files}, handle, indent=1)
    from worker_exit import finish

    finish()
