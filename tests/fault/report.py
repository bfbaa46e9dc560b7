"""Print the fault tests' JSON results as the Markdown table of bench/RESULTS.md.

    PYLON_FAULT_RESULTS=/tmp/faults.json .venv/bin/pytest -s tests/fault
    .venv/bin/python -m tests.fault.report /tmp/faults.json
"""

from __future__ import annotations

import json
import sys

COLUMNS = ("fault", "result", "accepted (offline)", "refused during the fault", "healed → whole",
           "all accepted delivered, after the heal", "slowest push → handler", "reconnects (resumed)",
           "duplicates dropped by the SDK", "duplicates to the app")


def _s(v) -> str:
    return "–" if v is None else f"{v:.2f} s"


def row(r: dict) -> list[str]:
    if "accepted" not in r:  # the system was not whole before the fault
        return [r["fault"], "**fail** (not whole before)"] + ["–"] * (len(COLUMNS) - 2)
    sdk = r["sdk"]
    return [
        f"`{r['fault']}`",
        "pass" if r["passed"] else "**fail**",
        f"{r['accepted']} ({r.get('offline_accepted', 0)})",
        str(r["publisher"]["refused"]),
        _s(r["healed_to_whole_s"]),
        _s(r["all_delivered_after_heal_s"]),
        _s(r["max_push_to_handler_s"]),
        f"{sdk.get('reconnects', sdk['connects'])} ({sdk['resumed']})",
        str(sdk["duplicates_dropped"]),
        str(r["duplicates_to_app"]),
    ]


def main(path: str) -> int:
    with open(path) as fh:
        data = json.load(fh)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in data["scenarios"]:
        print("| " + " | ".join(row(r)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
