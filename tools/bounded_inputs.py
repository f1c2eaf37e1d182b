"""Hostile inputs against the real `rankfeed convert` / `inspect`: each must end with a clear
error (or a rejected row) within seconds, in bounded memory. Prints, per case: exit code,
seconds, the child's peak RSS, and the message.

    python3 tools/bounded_inputs.py [path/to/rankfeed]

Also imported by tests/python/test_bounded_inputs.py, which asserts the bounds.
"""

import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data/sample/bert/tokenizer.json"
ROW = '{"query": "q", "pos": ["a cat"], "neg": ["a dog"]}'
LIMIT_S = 30

# Measures one child's peak RSS: a fresh interpreter has waited for no other child.
_MEASURE = """
import json, resource, subprocess, sys, time
t = time.monotonic()
try:
    p = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=%d)
    code, out = p.returncode, (p.stderr + p.stdout)
except subprocess.TimeoutExpired:
    code, out = "timeout", ""
print(json.dumps({"code": code, "seconds": time.monotonic() - t, "output": out,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
""" % LIMIT_S


def measure(cmd):
    p = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, cmd)], capture_output=True,
                       text=True, check=True)
    return json.loads(p.stdout)


def cases(tmp, binary):
    """(name, command, text the output must contain)."""
    tmp = pathlib.Path(tmp)
    fifo = tmp / "fifo.jsonl"
    os.mkfifo(fifo)
    zero = tmp / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    long = tmp / "long.jsonl"
    with open(long, "w") as f:
        f.write(ROW + "\n" + '{"query": "q", "pos": ["')
        chunk = "a" * (1 << 20)
        for _ in range(200):
            f.write(chunk)
        f.write('"], "neg": []}\n' + ROW + "\n")
    ds = tmp / "ds"
    subprocess.run([binary, "convert", ROOT / "tests/fixtures/roundtrip.jsonl", "--tokenizer",
                    TOKENIZER, "-o", ds], check=True, capture_output=True)
    fifo_ds = tmp / "fifo-ds"
    shutil.copytree(ds, fifo_ds)
    (fifo_ds / "manifest.json").unlink()
    os.mkfifo(fifo_ds / "manifest.json")
    zero_ds = tmp / "zero-ds"
    shutil.copytree(ds, zero_ds)
    (zero_ds / "manifest.json").unlink()
    (zero_ds / "manifest.json").symlink_to("/dev/zero")
    huge_ds = tmp / "huge-ds"
    shutil.copytree(ds, huge_ds)
    with open(huge_ds / "manifest.json", "r+b") as f:
        f.truncate(2 << 30)  # sparse 2 GiB
    conv = [binary, "convert", "--tokenizer", TOKENIZER, "--on-error", "skip", "-o"]
    return [
        ("FIFO .jsonl input", conv + [tmp / "o1", fifo], "not a regular file (a FIFO)"),
        (".jsonl -> /dev/zero", conv + [tmp / "o2", zero], "not a regular file (a device)"),
        ("200 MB line", conv + [tmp / "o3", long], "rejected line_too_long: 1"),
        ("manifest.json FIFO", [binary, "inspect", fifo_ds], "not a regular file (a FIFO)"),
        ("manifest.json -> /dev/zero", [binary, "inspect", zero_ds], "not a regular file"),
        ("2 GiB manifest.json", [binary, "inspect", huge_ds], "not a manifest"),
    ]


def run_all(binary):
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for name, cmd, expect in cases(tmp, binary):
            r = measure(cmd)
            r.update(name=name, expect=expect)
            results.append(r)
        return results


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else ROOT / "target/release/rankfeed"
    print(f"{'case':<28} {'exit':>7} {'seconds':>8} {'max RSS MB':>11}  message")
    for r in run_all(binary):
        msg = next((l.strip() for l in r["output"].splitlines() if r["expect"] in l), "")
        print(f"{r['name']:<28} {r['code']!s:>7} {r['seconds']:>8.2f} {r['max_rss_mb']:>11.1f}  {msg}")


if __name__ == "__main__":
    main()
