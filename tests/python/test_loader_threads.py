"""A thread reading a loader's len / step / state_dict() does not starve the thread iterating
it (issue 18); `tools/poller_bench.py` measures the same with the README's figures."""

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import poller_bench  # noqa: E402

# CI-safe bounds (2 busy cores); the target, measured by the tool, is >= 50% and <= 100 ms.
MIN_RATIO = 0.3
MAX_NEXT = 0.5


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return poller_bench.sample_dataset(tmp_path_factory.mktemp("poll") / "ds")


@pytest.mark.parametrize("kw", [{}, {"max_tokens": 4096, "batch_size": 64}],
                         ids=["batch_size", "max_tokens"])
def test_polling_does_not_starve_the_iterator(sample, kw):
    # Regression: len() took the loader's mutex, which the iterator waited for by spinning on
    # try_lock, so a thread polling len() held it nearly always: one next() took 70 s; and a
    # thread polling step kept the GIL until the 5 ms switch interval: 16% of the batches.
    solo = poller_bench.measure(sample, None, 1.0, **kw)
    for name in ("len", "step", "state_dict"):
        r = poller_bench.measure(sample, poller_bench.POLLS[name], 1.0, **kw)
        ratio = r["rate"] / solo["rate"]
        print(f"polling {name}: {100 * ratio:.0f}% of {solo['rate']:,.0f} batches/s solo, "
              f"slowest next() {r['slowest'] * 1e3:.1f} ms, {r['polls']:,.0f} polls/s")
        assert r["polls"] > 0
        assert ratio >= MIN_RATIO, (name, ratio)
        assert r["slowest"] <= MAX_NEXT, (name, r["slowest"])
