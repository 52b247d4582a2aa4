"""Running a transformers model on the paged KV cache.

OS idea: the program does not know it is paged; the MMU translates its loads and stores behind its
back (OSTEP ch. 18). KV counterpart: vLLM paper section 5 (implementation): the model's code is
unchanged, only its attention reads and writes through block tables. Here transformers' attention
interface plays the MMU: a function registered as "minipaged" replaces the model's attention, and
every layer calls it with that layer's new keys and values.

One step, whatever mix of prefills and decodes it holds, is one forward pass:

- the scheduled sequences' new tokens are packed into one row, `input_ids [1, num_tokens]`, with
  each token's position in its own sequence in `position_ids [1, num_tokens]`;
- the step's metadata (slot_mapping, block_tables, seq_lens, query_start_loc and the pools) travels
  as the keyword argument `minipaged`, which transformers hands to every attention call;
- each layer's attention writes its keys and values through the slot mapping (write_kv), then
  attends through the block tables (paged_attention). `use_cache=False`: transformers keeps no
  cache of its own.

No model-specific code: any decoder model whose attention goes through the attention interface works.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minipaged.backend import KVBackend
from minipaged.reference.block_manager import BlockManager
from minipaged.reference.scheduler import SchedulerOutput

ATTN_IMPLEMENTATION = "minipaged"


@dataclass
class StepMetadata:
    """What every layer's attention needs to find this step's K/V slots and each sequence's blocks."""

    backend: KVBackend
    # per layer [num_blocks, block_size, num_kv_heads, head_dim]
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    # [num_tokens] int64; -1: a slot another sequence writes this step
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_seq_len: int
    # id(attention module) -> layer index
    layer_of: dict[int, int] = field(default_factory=dict)

    def layer_index(self, module: torch.nn.Module) -> int:
        """The module's layer: its `layer_idx` when it has one, else the order of the first calls."""
        index = getattr(module, "layer_idx", None)
        if index is None:
            index = self.layer_of.setdefault(id(module), len(self.layer_of))
        return index


@dataclass
class StepInputs:
    """Everything a step's forward pass needs, as CPU-built tensors and plain lists: what the
    scheduler decided, translated to token rows. A tensor-parallel group sends exactly this from
    rank 0 to the other ranks (distributed/runner.py), which hold no scheduler or block manager."""

    input_ids: torch.Tensor  # [1, num_tokens] int64
    position_ids: torch.Tensor  # [1, num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64; -1: written by another sequence
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with -1
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    last: (
        torch.Tensor
    )  # [num_seqs] int64: each sequence's last row, where its logits are
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """The attention function registered with transformers: write K/V through the table, then attend.

    Args:
        module: the attention layer (its `layer_idx` picks the layer's pools).
        query: `[1, num_heads, num_tokens, head_dim]`, the step's packed tokens.
        key: `[1, num_kv_heads, num_tokens, head_dim]`, positions already applied (RoPE).
        value: `[1, num_kv_heads, num_tokens, head_dim]`.
        attention_mask: ignored: causality and sequence boundaries come from the step's metadata.
        scaling: the model's softmax scale (OPT passes 1.0, having scaled the query itself).
        dropout: must be 0 (inference).
        **kwargs: `minipaged`, the StepMetadata; `sliding_window` from models that have one.

    Returns:
        `([1, num_tokens, num_heads, head_dim], None)`, as transformers' attention functions return.
    """
    step: StepMetadata | None = kwargs.get(ATTN_IMPLEMENTATION)
    if step is None:
        raise RuntimeError(
            "minipaged attention needs the step's metadata: run the model through ModelRunner"
        )
    window = kwargs.get("sliding_window")
    if window is not None and step.max_seq_len > window:
        raise NotImplementedError(
            f"sliding-window attention (window {window}) is not supported by minipaged"
        )
    layer = step.layer_index(module)
    k_cache, v_cache = step.k_caches[layer], step.v_caches[layer]
    q = query[0].transpose(0, 1)  # [num_tokens, num_heads, head_dim]
    k = key[0].transpose(0, 1)  # [num_tokens, num_kv_heads, head_dim]
    v = value[0].transpose(0, 1)
    # first write, so a token sees itself
    step.backend.write_kv(k, v, k_cache, v_cache, step.slot_mapping)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = step.backend.paged_attention(
        q,
        k_cache,
        v_cache,
        step.block_tables,
        step.seq_lens,
        step.query_start_loc,
        float(scale),
    )  # [num_tokens, num_heads, head_dim]
    return out.unsqueeze(0), None


def register_paged_attention() -> None:
    """Register paged_attention_forward with transformers' attention interface as "minipaged".

    Done when a ModelRunner is built, not when this module is imported: transformers takes seconds to
    import, and `import minipaged` needs no model. Registering again replaces the entry: harmless.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)


def kv_shape(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a transformers decoder config."""
    config = config.get_text_config()
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return config.num_hidden_layers, num_kv_heads, head_dim


class ModelRunner:
    """Holds the model and its KV pools; executes one scheduled step and returns the logits.

    Args:
        model: a transformers decoder model (it is switched to the "minipaged" attention).
        backend: the kernel contract's implementation.
        block_manager: whose block tables the step reads; None on a tensor-parallel worker, which
            is given each step's StepInputs instead (then give the pool sizes).
        device: where the model and the device pool live.
        num_kv_heads: KV heads in this runner's pools (None: the model's; a tensor-parallel rank
            holds its share).
        pool_blocks: (device blocks, host blocks, block size) when there is no block manager to ask.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        backend: KVBackend,
        block_manager: BlockManager | None,
        device: str | torch.device,
        num_kv_heads: int | None = None,
        pool_blocks: tuple[int, int, int] | None = None,
    ) -> None:
        register_paged_attention()
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.model = model.to(device)
        self.backend = backend
        self.block_manager = block_manager
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        num_layers, model_kv_heads, head_dim = kv_shape(model.config)
        num_kv_heads = num_kv_heads or model_kv_heads
        if block_manager is not None:
            m = block_manager
            pool_blocks = (m.device.num_blocks, m.host.num_blocks, m.block_size)
        num_device_blocks, num_host_blocks, block_size = pool_blocks
        device_shape = (num_device_blocks, block_size, num_kv_heads, head_dim)
        host_shape = (num_host_blocks, block_size, num_kv_heads, head_dim)
        # unwritten slots hold NaN: reading one would show in the output
        nan = float("nan")
        self.k_caches = [
            torch.full(device_shape, nan, dtype=self.dtype, device=device)
            for _ in range(num_layers)
        ]
        self.v_caches = [
            torch.full(device_shape, nan, dtype=self.dtype, device=device)
            for _ in range(num_layers)
        ]
        # page-locked, as vLLM's swap space: the GPU copies it directly
        pin = self.device.type == "cuda"
        self.host_k_caches = [
            torch.full(host_shape, nan, dtype=self.dtype, pin_memory=pin)
            for _ in range(num_layers)
        ]
        self.host_v_caches = [
            torch.full(host_shape, nan, dtype=self.dtype, pin_memory=pin)
            for _ in range(num_layers)
        ]

    def move_blocks(self, out: SchedulerOutput | StepInputs) -> None:
        """Carry out the step's block moves, in order: swap out, swap in, copy-on-write."""
        pools = zip(
            self.k_caches + self.v_caches,
            self.host_k_caches + self.host_v_caches,
            strict=True,
        )
        pools = list(pools)
        if out.blocks_to_swap_out:
            # [n, 2] on the CPU
            mapping = torch.tensor(out.blocks_to_swap_out, dtype=torch.int64)
            for device_pool, host_pool in pools:
                self.backend.swap_blocks(device_pool, host_pool, mapping)
        if out.blocks_to_swap_in:
            mapping = torch.tensor(out.blocks_to_swap_in, dtype=torch.int64)
            for device_pool, host_pool in pools:
                self.backend.swap_blocks(host_pool, device_pool, mapping)
        if out.blocks_to_copy:
            mapping = torch.tensor(
                out.blocks_to_copy, dtype=torch.int64, device=self.device
            )
            self.backend.copy_blocks(self.k_caches, self.v_caches, mapping)

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        """Pack the step's tokens into one row, with each one's slot and each sequence's table.

        Everything is built on the CPU, from the block manager's tables; `run` moves it to the
        device. A tensor-parallel rank 0 sends the result to the other ranks as it is.
        """
        tokens, positions, slots, tables, seq_lens, starts = [], [], [], [], [], [0]
        written: set[int] = set()
        for item in out.scheduled:
            seq, q_len = item.seq, item.num_query_tokens
            table = self.block_manager.get_block_table(item.seq)
            # the query: the tokens after those cached (the rest, or a chunk)
            first, end = item.num_computed_tokens, item.seq_len
            tokens += seq.token_ids[first:end]
            positions += range(first, end)
            for slot in table.slot_mapping(q_len):
                # a shared block is written once a step
                slots.append(-1 if slot in written else slot)
                written.add(slot)
            tables.append(table)
            seq_lens.append(end)
            starts.append(starts[-1] + q_len)
        width = max((len(t) for t in tables), default=0)
        return StepInputs(
            input_ids=torch.tensor([tokens], dtype=torch.int64),
            position_ids=torch.tensor([positions], dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=torch.tensor(
                [t.block_ids + [-1] * (width - len(t)) for t in tables],
                dtype=torch.int32,
            ).reshape(len(tables), width),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            last=torch.tensor(starts[1:], dtype=torch.int64) - 1,
            blocks_to_swap_out=list(out.blocks_to_swap_out),
            blocks_to_swap_in=list(out.blocks_to_swap_in),
            blocks_to_copy=list(out.blocks_to_copy),
        )

    def metadata(self, inputs: StepInputs) -> StepMetadata:
        """The step's metadata on the device, with this runner's pools, for every layer."""
        device = self.device
        return StepMetadata(
            backend=self.backend,
            k_caches=self.k_caches,
            v_caches=self.v_caches,
            slot_mapping=inputs.slot_mapping.to(device),
            block_tables=inputs.block_tables.to(device),
            seq_lens=inputs.seq_lens.to(device),
            query_start_loc=inputs.query_start_loc.to(device),
            max_seq_len=int(inputs.seq_lens.max()),
        )

    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Move blocks, run the model on the step, return next-token logits `[num_seqs, vocab]` in float32."""
        return self.run(self.prepare(out))

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Move the step's blocks, then one forward pass; logits `[num_seqs, vocab]` in float32."""
        self.move_blocks(inputs)
        if inputs.last.numel() == 0:  # the step only moved blocks
            return torch.empty(0)
        output = self.model(
            input_ids=inputs.input_ids.to(self.device),
            position_ids=inputs.position_ids.to(self.device),
            use_cache=False,
            logits_to_keep=inputs.last.to(self.device),
            **{ATTN_IMPLEMENTATION: self.metadata(inputs)},
        )
        return output.logits[0].float()  # [num_seqs, vocab]
