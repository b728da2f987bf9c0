"""tests/harness.measured, which the benchmarks' per-stage figures come from: the peak RSS is the child's own, not
the high-water mark of the (larger) process that started it; exit codes and output pass through."""

import sys

from tests.harness import ROOT, measured


def test_peak_rss_is_the_childs_not_the_parents():
    ballast = bytearray(200 * 2 ** 20)
    ballast[:: 4096] = b"\1" * len(ballast[:: 4096])  # touched: 200 MiB resident in this process
    small = measured([sys.executable, "-c", "pass"], ROOT)
    big = measured([sys.executable, "-c", "b = bytearray(120 * 2 ** 20); b[::4096] = b'\\1' * len(b[::4096])"], ROOT)
    assert small.peak_rss_mb < 100 < big.peak_rss_mb < 200
    del ballast


def test_exit_code_and_output():
    m = measured([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"], ROOT)
    assert (m.rc, m.stdout, m.stderr) == (3, "out\n", "err\n")
    assert measured(["sh", "-c", "kill -9 $$"], ROOT).rc == 128 + 9
