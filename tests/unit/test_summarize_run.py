"""tools/summarize_run.py reads a run's TensorBoard events back; anything that is not a run is refused clearly."""

import sys
from pathlib import Path

from lance_ds.metrics import TensorBoard

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import summarize_run  # noqa: E402


def test_summary_of_a_run_and_refusal_of_anything_else(tmp_path, capsys):
    board = TensorBoard(tmp_path / "run" / "tensorboard", enabled=True)
    for step, loss in ((10, 2.5), (20, 1.25)):
        board.scalars(step, {"train/loss": loss, "val/loss": loss + 1, "val/skipped": 3.0, "train/mse/t2i": loss,
                             "train/ce_tokens": 100.0})
    board.close()
    assert summarize_run.main([str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "train/loss" in out and "2.5000 (  10)" in out and "1.2500 (  20)" in out
    assert "val/loss" in out and "train/mse/t2i" in out
    assert "val/skipped" not in out and "ce_tokens" not in out  # losses only
    (tmp_path / "run" / "checkpoints").mkdir()
    assert summarize_run.main([str(tmp_path / "run" / "checkpoints")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
