"""Progress display: a bar on a terminal, periodic plain lines in a log."""
from __future__ import annotations

import io

from rlhf_core.runtime import tracking
from rlhf_core.runtime.tracking import LineProgress, progress


def test_a_log_gets_plain_progress_lines_not_carriage_returns(monkeypatch):
    """Not a terminal: one line per period (every step here, with the period set to 0) and one at the
    end, each saying the step, the total, the rate and the latest numbers; never a carriage return."""
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr(tracking, "PROGRESS_EVERY_S", 0.0)
    bar = progress(2, 5, "sft")
    assert isinstance(bar, LineProgress)
    for step in bar:
        bar.set_postfix(loss=f"{1 / step:.2f}")
    bar.close()
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue()
    assert [line.split(",")[0] for line in lines] == ["sft: step 3/5 (60%)", "sft: step 4/5 (80%)",
                                                     "sft: step 5/5 (100%)", "sft: step 5/5 (100%)"]
    assert lines[-1].endswith("loss=0.20") and "steps/s" in lines[-1]


def test_a_terminal_gets_a_bar_and_a_quiet_log_gets_only_the_last_line(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    assert not isinstance(progress(0, 3, "ppo", unit="iteration"), LineProgress)  # tqdm's bar
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    bar = progress(0, 3, "ppo", unit="iteration")  # the period (10 s) never elapses in this loop
    assert list(bar) == [1, 2, 3]
    bar.close()
    assert err.getvalue().splitlines()[0].startswith("ppo: iteration 3/3 (100%)")
