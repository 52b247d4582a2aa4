"""/metrics: what the server is doing, in Prometheus' text format.

OS idea: vmstat and /proc. The kernel keeps counters (processes runnable and blocked, pages free
and used, pages swapped) and any tool reads them without stopping the system. Here the engine loop
publishes an EngineSnapshot after each step (a new object, never changed afterwards, so a reader on
another thread sees one consistent step), and the collector turns the latest one into metrics when
Prometheus scrapes. Names follow vLLM's (vllm:num_requests_running ...), prefixed `minipaged_`.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's figures after one step of the loop.

    Attributes:
        num_running, num_waiting, num_swapped: requests (sequence groups) in each scheduler queue.
        blocks_used, blocks_free: the device KV pool.
        num_preemptions: {"recompute": n, "swap": n} since the engine was built.
        prefix_cache_hits, prefix_cache_misses: full prompt blocks found (or not) in the prefix cache.
        prompt_tokens, generation_tokens: the tokens of the requests the server finished.
        num_finished, num_aborted, num_failed: requests finished, aborted (client gone or shutdown),
            and lost to an engine error.
    """

    num_running: int
    num_waiting: int
    num_swapped: int
    blocks_used: int
    blocks_free: int
    num_preemptions: dict
    prefix_cache_hits: int
    prefix_cache_misses: int
    prompt_tokens: int
    generation_tokens: int
    num_finished: int
    num_aborted: int
    num_failed: int

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hits over lookups (0 before any lookup)."""
        lookups = self.prefix_cache_hits + self.prefix_cache_misses
        return self.prefix_cache_hits / lookups if lookups else 0.0


def snapshot(llm, loop) -> EngineSnapshot:
    """Read the figures of `llm` and of the engine loop `loop` (on the engine thread)."""
    scheduler, device, stats = llm.scheduler, llm.block_manager.device, llm.stats
    return EngineSnapshot(
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        num_swapped=len(scheduler.swapped),
        blocks_used=device.num_used,
        blocks_free=device.num_free,
        num_preemptions=dict(stats.num_preemptions),
        prefix_cache_hits=stats.prefix_cache_hits,
        prefix_cache_misses=stats.prefix_cache_misses,
        prompt_tokens=loop.prompt_tokens,
        generation_tokens=loop.generation_tokens,
        num_finished=loop.num_finished,
        num_aborted=loop.num_aborted,
        num_failed=loop.num_failed,
    )


class EngineCollector:
    """A Prometheus collector that reports the engine loop's latest snapshot at each scrape."""

    def __init__(self, loop) -> None:
        self.loop = loop

    def collect(self):
        s: EngineSnapshot = self.loop.snapshot
        for name, value, doc in [
            ("num_requests_running", s.num_running, "Requests running on the device."),
            ("num_requests_waiting", s.num_waiting, "Requests waiting to be admitted."),
            (
                "num_requests_swapped",
                s.num_swapped,
                "Requests swapped out to the host pool.",
            ),
            ("kv_blocks_used", s.blocks_used, "Device KV blocks in use."),
            ("kv_blocks_free", s.blocks_free, "Device KV blocks free."),
            (
                "prefix_cache_hit_rate",
                s.prefix_cache_hit_rate,
                "Prefix-cache hits over lookups.",
            ),
        ]:
            yield GaugeMetricFamily(f"minipaged_{name}", doc, value=value)
        preemptions = CounterMetricFamily(
            "minipaged_num_preemptions", "Requests preempted, by mode.", labels=["mode"]
        )
        for mode, count in sorted(s.num_preemptions.items()):
            preemptions.add_metric([mode], count)
        yield preemptions
        for name, value, doc in [
            (
                "prompt_tokens",
                s.prompt_tokens,
                "Prompt tokens of the finished requests.",
            ),
            (
                "generation_tokens",
                s.generation_tokens,
                "Tokens generated for the finished requests.",
            ),
            ("requests_finished", s.num_finished, "Requests finished."),
            (
                "requests_aborted",
                s.num_aborted,
                "Requests aborted (client gone, or shutdown).",
            ),
            ("requests_failed", s.num_failed, "Requests lost to an engine error."),
        ]:
            yield CounterMetricFamily(f"minipaged_{name}", doc, value=value)


def make_registry(loop) -> CollectorRegistry:
    """A registry of its own for one app (never the global one: two servers in a process must not mix)."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(loop))
    return registry
