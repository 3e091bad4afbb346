"""
Timing and memory instrumentation for the MC training step that never forces a device sync on the
hot path: numbers are recorded as device-side objects and turned into Python floats only when read
(the trainer reads them at its log cadence, where it synchronizes anyway).

- PhaseTimer(device)          `with timer("build"): ...` records one span per phase. On CUDA a span is a
                              pair of torch.cuda.Events enqueued on the stream (the GPU stamps them when
                              it gets there, the host does not wait); on CPU (and MPS) it is
                              time.perf_counter() around the block, which on CPU is the real compute
                              time because CPU ops run synchronously. .elapsed_ms() -> {phase: ms}
                              resolves the spans (on CUDA: waits for the last event).
- MetricMeter()               running sums between two log lines: .add(metrics) takes 0-d tensors / floats
                              (summed on device, no sync), .add_timer(timer) keeps timers to resolve later;
                              .means() -> {name: float} (the one sync), then .reset().
- memory_snapshot(device)     a text block: torch.cuda.memory_summary() on CUDA, process RSS/VMS from
                              psutil elsewhere (what MC_MEMORY_DEBUG=1 writes after each phase).
"""

import math
import os
import time
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.spans = {}  # name -> (start, end): Events on CUDA, floats (seconds) elsewhere
        self._ms = None

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self.spans[name] = (start, end)
        else:
            start = time.perf_counter()
            try:
                yield
            finally:
                self.spans[name] = (start, time.perf_counter())
        self._ms = None

    def elapsed_ms(self) -> dict:
        """{phase: milliseconds}. On CUDA this waits for the recorded work to finish (call at log time)."""
        if self._ms is None:
            if self.cuda:
                out = {}
                for name, (start, end) in self.spans.items():
                    end.synchronize()
                    out[name] = start.elapsed_time(end)
                self._ms = out
            else:
                self._ms = {name: (end - start) * 1000.0 for name, (start, end) in self.spans.items()}
        return dict(self._ms)


class MetricMeter:
    """Averages of metrics and phase timings over the micro-steps between two log lines."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums, self.counts, self.timers = {}, {}, []

    def add(self, metrics: dict, prefix: str = ""):
        for k, v in metrics.items():
            key = prefix + k
            if isinstance(v, torch.Tensor):  # NaN (nothing measured this time) is skipped, on device
                v = v.detach().float()
                ok = ~torch.isnan(v)
                v, n = torch.where(ok, v, 0.0), ok.float()
            else:
                v, n = float(v), (0.0 if math.isnan(float(v)) else 1.0)
                v = 0.0 if n == 0.0 else v
            self.sums[key] = self.sums[key] + v if key in self.sums else v
            self.counts[key] = self.counts[key] + n if key in self.counts else n

    def add_timer(self, timer: PhaseTimer, prefix: str = "", suffix: str = "_ms"):
        self.timers.append((timer, prefix, suffix))

    def means(self) -> dict:
        """{name: float}: the mean of every metric and timing since reset (resolves tensors and events).
        NaN values (e.g. no entry at some level of detail in a micro-batch) are left out of the mean; a
        metric that was NaN every time is dropped."""
        out = {}
        keys = list(self.sums)
        tensors = [k for k in keys if isinstance(self.sums[k], torch.Tensor)]
        values = {k: (float(self.sums[k]), float(self.counts[k])) for k in keys if k not in tensors}
        if tensors:  # one device -> host copy for all of them
            flat = torch.stack([torch.stack([self.sums[k], torch.as_tensor(self.counts[k], device=self.sums[k].device)])
                                for k in tensors]).tolist()
            values.update(zip(tensors, map(tuple, flat)))
        for k in keys:
            s, n = values[k]
            if n > 0:
                out[k] = s / n
        timing_sums, timing_counts = {}, {}
        for timer, prefix, suffix in self.timers:
            for name, ms in timer.elapsed_ms().items():
                key = f"{prefix}{name}{suffix}"
                timing_sums[key] = timing_sums.get(key, 0.0) + ms
                timing_counts[key] = timing_counts.get(key, 0) + 1
        out.update({k: timing_sums[k] / timing_counts[k] for k in timing_sums})
        return out


def memory_snapshot(device) -> str:
    """Memory state as text: the CUDA caching allocator's summary, or this process's RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_summary(device, abbreviated=True)
    # psutil only for the opt-in memory snapshots (MC_MEMORY_DEBUG)
    import psutil

    mem = psutil.Process(os.getpid()).memory_info()
    return f"process rss {mem.rss / 2**20:,.1f} MiB | vms {mem.vms / 2**20:,.1f} MiB\n"
