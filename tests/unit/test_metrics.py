"""Counters that TensorBoard shows for the whole run are sums over ranks (a real 2-process gloo group)."""

import pytest
import torch

from conftest import on_two_gloo_ranks
from lance_ds.metrics import summed_over_ranks


def _sum(rank: int) -> dict:
    return summed_over_ranks({"data/skipped": 1.0 + rank, "data/samples": 10.0 * (rank + 1)}, torch.device("cpu"))


def test_counters_are_summed_over_ranks():
    got = on_two_gloo_ranks(_sum)
    assert got == {rank: {"data/skipped": 3.0, "data/samples": 30.0} for rank in range(2)}
    alone = {"data/skipped": 2.0}
    assert summed_over_ranks(alone, torch.device("cpu")) == alone  # no process group: as is


def test_throughput_leaves_pauses_out_and_rates_the_runs_sums(monkeypatch):
    import lance_ds.metrics as metrics

    clock = [100.0]  # a clock the test moves (sleeps made the bounds depend on the machine's load)
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    speed = metrics.Throughput()
    clock[0] += 0.1  # a step
    with speed.paused():  # a validation or a save between steps
        clock[0] += 0.3
    totals = {"real_tokens": 300.0, "packed_tokens": 400.0, "samples": 3.0, "data_wait": 0.0}
    rates = speed.scalars(totals, world_size=2)
    assert rates["train/tokens_per_s"] == pytest.approx(300 / 0.1)  # the 0.3 s paused is not in the window's time
    assert rates["data/packing_efficiency"] == 0.75  # real / packed tokens of all ranks
    speed.reset()
    clock[0] += 0.2
    rates = speed.scalars({**totals, "data_wait": 0.2}, world_size=2)
    assert rates["train/data_wait_fraction"] == pytest.approx(0.5)  # 0.2 s of waiting over 2 ranks x 0.2 s
    assert rates["train/tokens_per_s"] == pytest.approx(300 / 0.2)


def test_model_flops_utilisation_counts_the_decoder_as_torchtitan_does(monkeypatch):
    """6 x the matmul parameters one token passes (one MoT expert) + 12 x layers x heads x head_dim per attended
    (query, key) pair; train/mfu against the GPU's dense bf16 peak, or log.peak_tflops; none on a CPU or in fp32."""
    import lance_ds.metrics as metrics
    from lance_ds.model.llm import LLMConfig
    from lance_ds.model.registry import SIZES

    llm = LLMConfig(vocab_size=10, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    flops = metrics.DecoderFlops.of(llm)
    one_layer = 64 * 16 * (4 + 2) * 2 + 3 * 64 * 128  # q, k, v, o (16 per head) + gate, up, down
    assert flops.per_token == 6 * 2 * one_layer and flops.per_pair == 12 * 2 * 4 * 16
    # the 3B geometry: ~2.8 B matmul parameters per token (the MoT decoder holds twice that, in two experts)
    assert metrics.DecoderFlops.of(SIZES["3b"].llm).per_token / 6 == pytest.approx(2.77e9, rel=0.01)
    clock = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    speed = metrics.Throughput()
    clock[0] += 2.0
    totals = {"real_tokens": 1000.0, "packed_tokens": 1000.0, "samples": 2.0, "data_wait": 0.0,
              "attended_pairs": 2 * 500.0 ** 2}
    rates = speed.scalars(totals, world_size=4, flops=flops, peak=1e-3)
    expected = (flops.per_token * 1000 + flops.per_pair * 500_000) / 4 / 2.0 / 1e12
    assert rates["train/tflops_per_rank"] == pytest.approx(expected)
    assert rates["train/mfu"] == pytest.approx(expected / 1e-3)
    assert "train/mfu" not in speed.scalars(totals, world_size=4, flops=flops)  # no known peak
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert metrics.peak_tflops(cuda, "bf16") == 989.0 and metrics.peak_tflops(cuda, "fp32") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert metrics.peak_tflops(cuda, "bf16") == 756.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some New GPU")
    assert metrics.peak_tflops(cuda, "bf16") is None and metrics.peak_tflops(cuda, "bf16", 500.0) == 500.0
    assert metrics.peak_tflops(torch.device("cpu"), "bf16") is None


def test_a_windows_time_leaves_out_a_pause_under_way_and_carries_into_a_resumed_run(monkeypatch):
    """A save happens inside a pause (after validation): the window time it records must not count that pause; the
    resumed run's window goes on from it, start-up left out."""
    import lance_ds.metrics as metrics

    clock = [50.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    speed = metrics.Throughput()
    clock[0] += 2.0  # steps
    with speed.paused():
        clock[0] += 5.0  # validation, then the save reads the window
        saved = speed.seconds()
    assert saved == pytest.approx(2.0)
    resumed = metrics.Throughput()
    resumed.earlier_s = saved
    clock[0] += 30.0  # the resumed run's start-up
    resumed.restart_clock()
    clock[0] += 1.0
    assert resumed.seconds() == pytest.approx(3.0)
    meter = metrics.Meter()
    meter.add("train/grad_norm", 2.0)
    carried = metrics.Meter()
    carried.load_state_dict(meter.state_dict())
    carried.add("train/grad_norm", 4.0)
    assert carried.means() == {"train/grad_norm": 3.0}


def test_a_failing_tensorboard_write_turns_tensorboard_off_and_training_goes_on(tmp_path, capsys):
    """A full disk or a lost mount under the event file: the write's OSError ended the run, and closing after it
    raised again, so the rank never exited (its loader workers alive)."""
    import lance_ds.metrics as metrics

    tb = metrics.TensorBoard(tmp_path / "tb", enabled=True)
    tb.scalars(1, {"train/loss": 1.0})
    writer = tb.writer

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    writer.add_scalar = writer.close = full
    tb.scalars(2, {"train/loss": 0.5})
    assert tb.writer is None and "TensorBoard turned off" in capsys.readouterr().err
    tb.scalars(3, {"train/loss": 0.4})  # no-ops from here, no second warning
    tb.text("t", 3, "x")
    tb.close()
    assert capsys.readouterr().err == ""
