"""grpo/metrics.py: when the no-signal warning fires, and what it says."""

from grpo.metrics import no_signal_warning


def test_warning_fires_at_patience_then_every_five_patiences():
    fired = [s for s in range(0, 60) if no_signal_warning(s, patience=5, step=100 + s)]
    assert fired == [5, 25, 50]
    msg = no_signal_warning(5, patience=5, step=105)
    assert msg.startswith("WARNING: no learning signal: every group had zero reward variance")
    assert "for 5 consecutive steps (step 105)" in msg and "\n" not in msg
    assert no_signal_warning(0, patience=1, step=3) is None
    assert [s for s in range(1, 12) if no_signal_warning(s, patience=1, step=s)] == [1, 5, 10]
