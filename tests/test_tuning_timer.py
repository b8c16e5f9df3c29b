"""The decode products' tuning timer: each launch shape timed with its weight read from HBM (an L2
eviction before each replay, its own time subtracted), chosen by MHLA_STREAM_TUNE_COLD."""
import os
import subprocess
import sys

import pytest

from mhla_stream.kernels import triton_common


def test_cold_bench_reads_before_each_replay_and_subtracts_the_read(monkeypatch):
    calls = []

    def fake_graph_bench(fn, quantiles=None):
        fn()  # one replay of what would be captured
        return [5.0, 4.0, 6.0] if quantiles else 5.0
    monkeypatch.setattr(triton_common, "graph_bench", fake_graph_bench)
    monkeypatch.setattr(triton_common, "_evictor", lambda device: (lambda: calls.append("read"), 3.0))
    monkeypatch.setattr(triton_common.torch.cuda, "current_device", lambda: 0)
    launch = lambda: calls.append("launch")  # noqa: E731
    assert triton_common.cold_bench(launch) == 2.0
    assert calls == ["read", "launch"]  # the eviction precedes the launch it is for
    # the autotuner asks for quantiles: each one less the same read time, so the shapes' order holds
    assert triton_common.cold_bench(launch, quantiles=(0.5, 0.2, 0.8)) == [2.0, 1.0, 3.0]


@pytest.mark.parametrize("value,cold", [("0", False), ("off", False), ("1", True), ("", True)])
def test_the_products_tuners_take_the_timer_the_switch_names(value, cold):
    """Read in a fresh process: the kernel module reads the switch once at import."""
    env = {k: x for k, x in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MHLA_STREAM_TUNE_COLD"] = value
    code = ("from mhla_stream.kernels import triton_skinny as s; "
            "print(s.TIMER.__name__, s._gemm.do_bench.__name__ if hasattr(s._gemm, 'do_bench') else '-')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    timer, tuner = out.stdout.split()
    assert timer == ("cold_bench" if cold else "graph_bench")
    assert tuner in (timer, "-")
