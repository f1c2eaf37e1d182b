#!/usr/bin/env python3
"""Print the README's table of every loader option, from the one definition of them
(`rankfeed::options::Options`, as `rankfeed.LOADER_OPTIONS`). tests/python/test_stubs.py checks
that the README holds exactly this table; after changing an option, paste the output between
the README's `<!-- options:begin -->` and `<!-- options:end -->` lines."""

import rankfeed


def table():
    rows = ["| Python / checkpoint | CLI | Default | What it sets |", "|---|---|---|---|"]
    for o in rankfeed.LOADER_OPTIONS:
        default = "unset" if o["default"] is None else f"`{o['default']}`"
        help_ = " ".join(o["help"].split()).replace("|", "\\|")
        rows.append(f"| `{o['name']}` | `{o['flag']}` | {default} | {help_} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
