#!/usr/bin/env bash
# The environment of the sentence-transformers tests (see tools/requirements-st.txt):
# target/venv-st, a venv that sees the main environment's packages (torch and rankfeed are not
# installed twice) with sentence-transformers 6 and transformers 5 on top.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv --system-site-packages target/venv-st
target/venv-st/bin/python -m pip install --quiet -r tools/requirements-st.txt
target/venv-st/bin/python -c "import sentence_transformers as s, transformers as t; print(f'st env: sentence-transformers {s.__version__}, transformers {t.__version__}')"
