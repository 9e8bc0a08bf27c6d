"""What users watch: TensorBoard scalars, images, videos and text (rank 0), throughput and memory meters."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from .distributed import sum_over_ranks, world_size


def host_rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; falls back to the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def host_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def memory_scalars() -> dict[str, float]:
    out = {"memory/host_rss_gb": host_rss_bytes() / 2**30, "memory/host_peak_rss_gb": host_peak_rss_bytes() / 2**30}
    if torch.cuda.is_available():
        out["memory/device_allocated_gb"] = torch.cuda.memory_allocated() / 2**30
        out["memory/device_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def summed_over_ranks(counts: dict[str, float], device: torch.device) -> dict[str, float]:
    """`counts` summed over all ranks (a collective: every rank calls it with the same keys, in the same order)."""
    if not counts or world_size() == 1:
        return counts
    totals = sum_over_ranks(torch.tensor(list(counts.values()), dtype=torch.float64, device=device))
    return dict(zip(counts, totals.tolist()))


class Meter:
    """Averages of named values and sums of counters between two logging steps."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, name: str, value: float) -> None:
        self.sums[name] += float(value)
        self.counts[name] += 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.sums.update(state["sums"])
        self.counts.update(state["counts"])


@dataclass(frozen=True)
class DecoderFlops:
    """Training FLOPs (forward + backward) of the decoder, by the convention of PaLM's and torchtitan's MFU: 6 x the
    matmul parameters a token passes (one expert: MoT routes each token to one), plus 12 x layers x heads x head_dim
    per (query, key) pair of a sample's attention, a sample of n tokens counting n x n pairs. Recomputation
    (gradient checkpointing), the lm_head on scored tokens and the frozen ViT and VAE are left out."""

    per_token: float
    per_pair: float

    @classmethod
    def of(cls, llm) -> "DecoderFlops":
        """From the decoder's geometry (a model.llm.LLMConfig)."""
        head_dim = llm.hidden_size // llm.num_heads
        attention = 2 * llm.hidden_size * head_dim * (llm.num_heads + llm.num_kv_heads)  # q, o; k, v
        return cls(per_token=6 * llm.num_layers * (attention + 3 * llm.hidden_size * llm.intermediate_size),
                   per_pair=12 * llm.num_layers * llm.num_heads * head_dim)

    def __call__(self, tokens: float, pairs: float) -> float:
        return self.per_token * tokens + self.per_pair * pairs


# Dense bf16 / fp16 TFLOP/s of one GPU, by a part of its name (the first that matches: the more specific first)
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("B200", 2250.0),
               ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0))


def peak_tflops(device: torch.device, precision: str, configured: float | None = None) -> float | None:
    """The peak train/mfu is measured against: log.peak_tflops, else a known GPU's bf16 / fp16 dense peak (None on
    CPUs, unknown GPUs and fp32, which runs at another peak)."""
    if configured is not None:
        return configured
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for part, tflops in PEAK_TFLOPS if part in name), None)


class Throughput:
    """This rank's real tokens, packed tokens (padding and placeholders included), samples, attended (query, key)
    pairs of real samples and seconds waiting for data in one logging window, and the window's wall time less its
    pauses (validation, checkpoint saves)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.paused_s = 0.0
        self.pause_start: float | None = None  # inside paused(): since when
        self.earlier_s = 0.0  # the window's training time in the run it was resumed from
        self.counts = {"real_tokens": 0.0, "packed_tokens": 0.0, "samples": 0.0, "attended_pairs": 0.0,
                       "data_wait": 0.0}

    def seconds(self) -> float:
        """The window's training time so far (a pause under way left out too)."""
        now = time.perf_counter()
        pausing = now - self.pause_start if self.pause_start is not None else 0.0
        return now - self.start - self.paused_s - pausing + self.earlier_s

    def restart_clock(self) -> None:
        """Training starts now: the time before (start-up) is not the window's."""
        self.start, self.paused_s = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self):
        """Time spent here is no training time: it is left out of the window's rates."""
        self.pause_start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - self.pause_start
            self.pause_start = None

    def scalars(self, totals: dict[str, float], world_size: int, flops: DecoderFlops | None = None,
                peak: float | None = None) -> dict[str, float]:
        """The window's rates from `totals`, its counts summed over all ranks (they may differ between ranks); with
        the decoder's `flops`, its TFLOP/s per rank, and its model FLOPs utilisation against a `peak` (TFLOP/s)."""
        elapsed = max(self.seconds(), 1e-9)
        out = {
            "train/tokens_per_s": totals["real_tokens"] / elapsed,
            "train/samples_per_s": totals["samples"] / elapsed,
            "train/data_wait_fraction": totals["data_wait"] / world_size / elapsed,  # mean over ranks
            "data/packing_efficiency": totals["real_tokens"] / max(totals["packed_tokens"], 1.0),
        }
        if flops is not None:
            per_rank = flops(totals["real_tokens"], totals.get("attended_pairs", 0.0)) / world_size / elapsed / 1e12
            out["train/tflops_per_rank"] = per_rank
            if peak:
                out["train/mfu"] = per_rank / peak
        return out


class TensorBoard:
    """A SummaryWriter on rank 0 and nothing elsewhere, so call sites need no rank checks.

    purge_step: TensorBoard drops the points of earlier writers to log_dir at this step and after (a resumed run
    passes the step after its checkpoint, so what a killed run logged past it does not show twice).
    A write that fails (a full disk, a lost mount) turns TensorBoard off with one warning: the run and its
    checkpoints go on; what is watched matters less than a week of training."""

    def __init__(self, log_dir: str | Path, enabled: bool, purge_step: int | None = None, filename_suffix: str = ""):
        self.writer = None
        self.log_dir = log_dir
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step, filename_suffix=filename_suffix)

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except OSError as e:
            writer, self.writer = self.writer, None
            print(f"lance_ds: TensorBoard turned off: writing to {self.log_dir} failed ({type(e).__name__}: {e}); "
                  "training and checkpoints go on", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                writer.close()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            with self._writing():
                for tag, value in values.items():
                    self.writer.add_scalar(tag, value, step)

    def video_frames(self, tag: str, step: int, frames_thwc: torch.Tensor) -> None:
        """frames_thwc: uint8 [T, H, W, 3], shown as one strip of frames (no moviepy needed)."""
        if self.writer:
            strip = torch.cat(list(frames_thwc), dim=1)
            with self._writing():
                self.writer.add_image(tag, strip, step, dataformats="HWC")

    def text(self, tag: str, step: int, text: str) -> None:
        if self.writer:
            with self._writing():
                self.writer.add_text(tag, text, step)

    def hparams(self, params: dict[str, float | int | str | bool], metrics: dict[str, float]) -> None:
        if self.writer:
            with self._writing():
                self.writer.add_hparams(params, metrics, run_name=".")

    def flush(self) -> None:
        if self.writer:
            with self._writing():
                self.writer.flush()

    def close(self) -> None:
        if self.writer:
            with self._writing():
                self.writer.close()
