"""Without torch, only the tests that need it skip (issue 18: test_batching.py skipped its
torch-free property tests whenever torch was absent)."""

import ast
import subprocess
import sys

from conftest import ROOT

# Files whose tests mostly need no torch: each test that uses torch must skip on its own.
FILES = ["test_batching.py"]


def test_only_torch_tests_skip_without_torch(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    for name in FILES:
        path = ROOT / "tests" / "python" / name
        tree = ast.parse(path.read_text())
        tests = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")]
        uses_torch = {f.name for f in tests if "torch" in ast.unparse(f)}
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                            str(path)], capture_output=True, text=True, cwd=ROOT,
                           env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
        summary = p.stdout.strip().splitlines()[-1]
        want = f"{len(tests) - len(uses_torch)} passed, {len(uses_torch)} skipped"
        assert summary.startswith(want), f"{name}: {summary}\n{p.stdout[-2000:]}"
        print(f"{name} without torch: {summary}")
