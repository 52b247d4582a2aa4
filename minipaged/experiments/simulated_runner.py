"""A runner that computes nothing: the time a step would take, and tokens from a null policy.

OS idea: a trace-driven simulator runs the real policy code (the scheduler, the pager) against a
recorded trace and replaces only the expensive part, the program itself, with a model of what it
costs (OSTEP's homework simulators; every paging study since Belady's). KV counterpart: vLLM paper
section 6: the paper measures a real engine on GPUs; here the one engine loop (engine.LLM.step:
schedule -> move blocks -> run -> sample -> finish) serves a workload unchanged, and only the runner
behind it is simulated, as vLLM swaps its executor:

    llm = LLM(runner=SimulatedRunner(cost_model=CostModel("opt-13b", "A100-40GB")),
              num_gpu_blocks=..., block_size=16)

A step's time comes from a cost model (experiments/cost_model.py: weights, K/V and FLOPs, swaps
over PCIe, copy-on-write copies) or, for the memory experiments' null model, is a fixed
`step_time` whatever the batch. Its "logits" are seeded random numbers over a tiny null
vocabulary: the engine samples from them as from a model's, so parallel samples and beam search
run their real code (beams fork and exit under a seeded policy). A request ends at its true output
length because the experiments submit it with max_tokens = output_len and ignore_eos=True.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from minipaged.reference.scheduler import SchedulerOutput

if TYPE_CHECKING:
    from minipaged.experiments.cost_model import CostModel

NULL_VOCAB = 8  # the null policy's logits cover token ids 0..7
# Synthetic prompts may use any id below this (experiments/simulator.py makes each request's tokens
# unique, so that only prompts meant to share a prefix share blocks in the prefix cache).
SYNTHETIC_VOCAB = 1 << 62


class SimulatedRunner:
    """Null-policy logits and a step time, for engine.LLM(runner=...).

    Args:
        cost_model: prices each step (a CostModel); None: every step takes `step_time`.
        step_time: seconds per step when there is no cost model (the null model).
        block_size: tokens per KV block, to price swaps and copies by the bytes they move.
        max_model_len: the longest sequence the simulated model takes.
        seed: seeds the null policy.

    Raises:
        ValueError: naming the argument, for neither or both of cost_model and step_time, or a
            step_time that is not a positive number.
    """

    simulated = True  # the engine's clock runs on the step times this runner returns
    vocab_size = SYNTHETIC_VOCAB
    # the null model never ends a sequence early: lengths come from the trace
    eos_token_id = None

    def __init__(
        self,
        cost_model: CostModel | None = None,
        *,
        step_time: float | None = None,
        block_size: int = 16,
        max_model_len: int = 2048,
        seed: int = 0,
    ) -> None:
        if (cost_model is None) == (step_time is None):
            raise ValueError(
                "give exactly one of cost_model and step_time (the fixed null-model step)"
            )
        if step_time is not None and (
            not isinstance(step_time, (int, float))
            or isinstance(step_time, bool)
            or step_time <= 0
        ):
            raise ValueError(
                f"step_time must be a positive number of seconds, got {step_time!r}"
            )
        self.cost_model, self.fixed_step_time = cost_model, step_time
        self.block_size, self.max_model_len = block_size, max_model_len
        self.device = torch.device("cpu")
        self._generator = torch.Generator().manual_seed(seed)

    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Null-policy logits for each scheduled sequence: `[num_seqs, NULL_VOCAB]`, seeded."""
        return torch.randn(len(out.scheduled), NULL_VOCAB, generator=self._generator)

    def step_time(self, out: SchedulerOutput) -> float:
        """Seconds the step would take: the fixed step, or the cost model's price of its tokens,
        its context reads, its swaps (vLLM's swap_blocks copies each block of each layer's K and V
        cache apart: 2 x layers transfers a block, each paying a per-transfer cost) and its
        copy-on-write copies."""
        if self.cost_model is None:
            return self.fixed_step_time
        cost, bs = self.cost_model, self.block_size
        seconds = cost.step_time(
            [s.num_query_tokens for s in out.scheduled],
            [s.seq_len for s in out.scheduled],
        )
        swapped = len(out.blocks_to_swap_out) + len(out.blocks_to_swap_in)
        # vLLM copies a block's K and V of each layer separately: 2 x layers transfers
        if swapped:
            seconds += cost.swap_time(swapped, bs, swapped * 2 * cost.model.num_layers)
        if out.blocks_to_copy:
            seconds += cost.copy_time(len(out.blocks_to_copy), bs)
        return seconds


__all__ = ["NULL_VOCAB", "SYNTHETIC_VOCAB", "SimulatedRunner"]
