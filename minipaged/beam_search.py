"""Beam search over a group of sequences that share blocks: a process tree.

OS idea: a process tree: fork() makes children that share their parent's pages copy-on-write; a
child that exits gives its pages back; the tree's leaves are what is alive (OSTEP ch. 5). KV
counterpart: vLLM paper section 4.4, "Beam search": the beams are sequences of one group; a beam with
several surviving continuations is forked (its blocks shared, reference counts up), a beam with none
is freed, and copy-on-write separates them at the first write into a shared, partly filled block.

The selection follows transformers' generate(num_beams=W, do_sample=False) step for step, so the
beams returned are the same: each step takes the 2W best continuations over all beams (cumulative
log-probability), the best W that do not end (EOS, or max_tokens reached) stay running, and the ones
that end among the first W are kept as finished hypotheses, scored by
cumulative_logprob / num_generated_tokens ** length_penalty; the W best finished are returned.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minipaged.outputs import BeamSearchOutput, BeamSequence
from minipaged.reference.block_manager import BlockManager
from minipaged.sampling import BeamSearchParams
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus

NEG = -1.0e9  # transformers' "impossible" score


class BeamState:
    """The running beams' scores and the finished hypotheses of one beam-search request.

    Args:
        params: the request's BeamSearchParams.
        prompt_len: the prompt's length.
        eos_token_id: the token that ends a beam (None: none does).
    """

    def __init__(
        self, params: BeamSearchParams, prompt_len: int, eos_token_id: int | None
    ) -> None:
        width = params.beam_width
        self.params = params
        self.prompt_len = prompt_len
        self.eos_token_id = eos_token_id
        # [num_running]: cumulative logprob, in the group's seq order
        self.running_scores = torch.zeros(1)
        self.finished_scores = torch.full((width,), NEG)  # [W], best first
        # (tokens, cumulative logprob)
        self.finished: list[tuple[list[int], float] | None] = [None] * width
        self.is_finished = torch.zeros(width, dtype=torch.bool)
        self.improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
        self.num_generated = 0

    def step(
        self,
        seqs: list[Sequence],
        logits: torch.Tensor,
        group: SequenceGroup,
        manager: BlockManager,
    ) -> bool:
        """Advance the beams by one token after a model step; return True when the search is over.

        Args:
            seqs: the running beams, in the order of `self.running_scores`.
            logits: `[len(seqs), vocab]`, each beam's next-token logits.
            group: the request's group; its sequences become the new beams.
            manager: forks and frees the beams' blocks.
        """
        width, lp = self.params.beam_width, self.params.length_penalty
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [num_beams, vocab]
        vocab = logprobs.shape[1]
        # [num_beams * vocab]
        total = (logprobs + self.running_scores[:, None]).reshape(-1)
        # [k], best first
        top_scores, top_index = torch.topk(total, min(2 * width, total.numel()))
        parents, tokens = top_index // vocab, top_index % vocab
        self.num_generated += 1
        ends = (
            torch.zeros_like(tokens, dtype=torch.bool)
            if self.eos_token_id is None
            else tokens == self.eos_token_id
        )
        if self.num_generated >= self.params.max_tokens:
            ends[:] = True  # max_tokens: every continuation ends here
        # an ended continuation cannot keep running
        running = top_scores + ends.float() * NEG
        # [W]: the next running beams
        keep = torch.topk(running, min(width, running.numel())).indices

        # add the ended continuations among the first W to the finished ones
        if self.improvable:
            normalized = top_scores / (self.num_generated**lp)
            new = ends & (torch.arange(len(ends)) < width)
            merged = torch.cat(
                [self.finished_scores, normalized + (~new).float() * NEG]
            )
            best = torch.topk(merged, width).indices
            finished, flags = [], []
            for j in best.tolist():
                if j < width:
                    finished.append(self.finished[j])
                    flags.append(bool(self.is_finished[j]))
                else:
                    c = j - width
                    tokens_so_far = [
                        *seqs[int(parents[c])].output_token_ids,
                        int(tokens[c]),
                    ]
                    finished.append((tokens_so_far, float(top_scores[c])))
                    flags.append(bool(new[c]))
            self.finished, self.finished_scores = finished, merged[best]
            self.is_finished = torch.tensor(flags)

        self.running_scores = running[keep]
        best_possible = self.running_scores[0] / (self.num_generated**lp)
        worst = torch.where(
            self.is_finished, self.finished_scores.min(), torch.tensor(NEG)
        )
        self.improvable = self.improvable and bool((best_possible > worst).any())
        if not self.improvable or bool(ends.all()):
            for seq in seqs:
                manager.free(seq)
                seq.status = SequenceStatus.FINISHED_STOPPED
            return True
        self._advance(
            seqs,
            logprobs,
            [int(parents[c]) for c in keep],
            [int(tokens[c]) for c in keep],
            group,
            manager,
        )
        return False

    def _advance(self, seqs, logprobs, parents, tokens, group, manager) -> None:
        """Make the group's sequences the new beams: free parents dropped, fork parents kept twice.

        Dropped beams exit first, so their memory is back before the forks: a memory manager that
        cannot share (the Orca baselines, which give each beam its own reserved range) reuses a
        dropped beam's range for a forked child. Paged forks share blocks, so for them the order
        only changes which free blocks are handed out next.
        """
        kept = set(parents)
        for i, seq in enumerate(seqs):
            # no continuation survived: the beam exits and gives its blocks back
            if i not in kept:
                manager.free(seq)
                seq.status = SequenceStatus.FINISHED_ABORTED
        children: list[Sequence] = []
        used: set[int] = set()
        # fork before any token is appended: a child copies its parent as is
        for parent in parents:
            if parent in used:
                child = seqs[parent].fork()
                manager.fork(seqs[parent], child)
                children.append(child)
            else:
                used.add(parent)
                children.append(seqs[parent])
        for child, parent, token in zip(children, parents, tokens, strict=True):
            child.append_token_id(token, float(logprobs[parent, token]))
        group.seqs = children

    def output(
        self, request_id: str, prompt_ids: list[int], decode: Callable[[list[int]], str]
    ) -> BeamSearchOutput:
        """The finished beams, best first."""
        beams = [
            BeamSequence(list(tokens), cumulative, float(score), decode(tokens))
            for entry, score, flag in zip(
                self.finished,
                self.finished_scores.tolist(),
                self.is_finished.tolist(),
                strict=True,
            )
            if flag and entry is not None
            for tokens, cumulative in [entry]
        ]
        return BeamSearchOutput(request_id, list(prompt_ids), beams)
