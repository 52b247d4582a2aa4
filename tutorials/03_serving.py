# %% [markdown]
# # Tutorial 3: serving with the engine
#
# [Tutorial 1](../01_memory_manager/) managed blocks by hand and [tutorial
# 2](../02_paged_attention/) moved K/V through block tables by hand. The engine,
# `minipaged.LLM`, does both for a real transformers model, one step at a time. Each
# step it
#
# 1. **schedules**: picks the sequences of the step, admitting, preempting and resuming
#    requests ([scheduling](../../concepts/scheduling/));
# 2. **moves blocks**: swap out, swap in, copy-on-write;
# 3. **runs the model once** on all the step's tokens, packed into one row, with
#    attention reading and writing through the block tables;
# 4. **samples** a token for each sequence, and frees the blocks of the sequences that
#    finished.
#
# We generate greedily and by sampling, run a parallel-sampling request and a beam
# search, and then drive a run step by step on a pool too small for it, to watch
# preemption and swapping happen. Each `assert` states a fact to take away.

# %%
import torch

from minipaged import LLM, BeamSearchParams, SamplingParams
from minipaged.presets import load_preset

# %% [markdown]
# ## 1. A preset model
#
# `LLM("tiny-llama-docs")` loads a **preset**: a small Llama (4 layers, a hidden size
# of 192, 6 query heads sharing 2 KV heads) trained for a few minutes on this
# project's own docs, shipped with the package
# ([the trained preset](../../engine/trained-preset/)). Nothing is downloaded. Its
# text is readable, if not wise, and the engine runs it exactly as it would run a real
# checkpoint (`LLM("path/to/checkpoint")`). The other
# presets (`tiny-llama`, `tiny-gpt2`, ...) have seeded random weights: byte noise, for
# the tests. Presets come with a byte-level tokenizer: one token per UTF-8 byte, after
# the special tokens PAD, BOS and EOS.
#
# We choose the KV cache's size ourselves: blocks of 4 tokens, 64 of them. Left out,
# `num_gpu_blocks` would be derived from a memory budget.

# %%
llm = LLM("tiny-llama-docs", block_size=4, num_gpu_blocks=64, seed=0)
config = llm.model.config
print(
    f"{config.num_hidden_layers} layers, {config.num_attention_heads} query heads, "
    f"{config.num_key_value_heads} KV heads, vocabulary {config.vocab_size}"
)
print("'Hi' ->", llm.tokenizer.encode("Hi"))
print(
    f"{llm.cache_config.num_gpu_blocks} blocks of {llm.cache_config.block_size} tokens"
)
# BOS, then a token per byte
assert llm.tokenizer.encode("Hi") == [1, ord("H") + 3, ord("i") + 3]
assert llm.block_manager.device.num_free == 64

# %% [markdown]
# ## 2. Greedy and sampled generation
#
# `generate` takes a list of prompts (strings, or `{"prompt_token_ids": [...]}`) and one
# `SamplingParams` for all of them (or one each). `temperature=0.0` is greedy decoding:
# the most likely token at every step. The three prompts run as one batch.

# %%
prompts = ["The cat sat", "Paging is", "Hello, world"]
greedy = SamplingParams(temperature=0.0, max_tokens=8)
outputs = llm.generate(prompts, greedy, use_tqdm=False)
for out in outputs:
    completion = out.outputs[0]
    print(f"{out.prompt!r:15} -> {completion.token_ids}  {completion.text!r}")
assert [
    out.outputs[0].token_ids for out in llm.generate(prompts, greedy, use_tqdm=False)
] == [out.outputs[0].token_ids for out in outputs]  # greedy: the same tokens every time

# %% [markdown]
# The paged KV cache changes where K/V live, not what the model computes. A separate
# copy of the same preset, run by transformers' own `generate` with its usual attention
# and no paging, gives the same tokens:

# %%
reference_model = load_preset("tiny-llama-docs")
for prompt, out in zip(prompts, outputs, strict=True):
    input_ids = torch.tensor([llm.tokenizer.encode(prompt)])
    expected = reference_model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=8,
    )
    assert expected[0, input_ids.shape[1] :].tolist() == out.outputs[0].token_ids
print("transformers' generate agrees on all three prompts")

# %% [markdown]
# Sampling draws from the model's distribution, reshaped by `temperature`, `top_k` and
# `top_p`. Each sequence draws from its own random generator, seeded by the request's
# `seed` and the sample's index, so a seeded request gives the same tokens whichever
# other requests share its batch.

# %%
sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, seed=123)
batch = llm.generate(prompts, sampled, use_tqdm=False)
alone = llm.generate(prompts[1], sampled, use_tqdm=False)
for out in batch:
    print(f"{out.prompt!r:15} -> {out.outputs[0].token_ids}")
# batched or alone: the same
assert alone[0].outputs[0].token_ids == batch[1].outputs[0].token_ids
# not the greedy choice
assert batch[1].outputs[0].token_ids != outputs[1].outputs[0].token_ids

# %% [markdown]
# ## 3. Parallel sampling: three samples, one prompt
#
# `n=3` asks for three completions of one prompt. The engine makes one sequence and
# forks it twice ([process trees](../../concepts/process-trees/)); the three share the
# prompt's blocks. To watch the sharing we drive the engine ourselves: `add_request`
# queues the request and `step()` runs one iteration.

# %%
three = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7)
# 10 tokens: 2 full blocks and 2 slots of a third
request_id = llm.add_request("Paging is", three)
llm.step()  # the first step: the prefill
(group,) = llm.scheduler.running
tables = [llm.block_manager.get_block_table(seq).block_ids for seq in group.seqs]
counts = [llm.block_manager.device.ref_count(block) for block in tables[0]]
print("tables after the prefill:", tables, " reference counts:", counts)
assert tables[0] == tables[1] == tables[2] and counts == [3, 3, 3]
# the prompt once, then each sample's last token
assert llm.step_stats[-1].num_batched_tokens == 10 + 1 + 1

# the second: each sample writes its first token into the shared, partly filled block
llm.step()
tables = [llm.block_manager.get_block_table(seq).block_ids for seq in group.seqs]
print(
    "tables after the first decode:",
    tables,
    " copies:",
    llm.step_stats[-1].blocks_copied,
)
# copy-on-write for two samples; the third writes in place
assert llm.step_stats[-1].blocks_copied == 2
assert (
    len({table[-1] for table in tables}) == 3
    and len({table[0] for table in tables}) == 1
)

finished = []
while llm.has_unfinished_requests():
    finished += llm.step()  # step() returns the requests that finished in it
(result,) = finished
for completion in result.outputs:
    print(completion.index, completion.token_ids)
assert result.request_id == request_id and len(result.outputs) == 3
assert len({tuple(c.token_ids) for c in result.outputs}) == 3  # three different samples

# %% [markdown]
# ## 4. Beam search
#
# `beam_search` keeps the `beam_width` most likely outputs at every step. Its beams are
# sequences of one request that fork when a beam has several good continuations and exit
# when it has none, sharing blocks all the while. The selection is transformers', so it
# returns the same beams as `generate(num_beams=3)`, scored by
# `cumulative_logprob / len ** length_penalty`.

# %%
beam_params = BeamSearchParams(beam_width=3, max_tokens=8)
(beams,) = llm.beam_search("Paging is", beam_params)
for beam in beams.sequences:
    print(
        f"{beam.token_ids}  score {beam.score:.4f}  "
        f"logprob {beam.cumulative_logprob:.4f}"
    )
scores = [beam.score for beam in beams.sequences]
assert scores == sorted(scores, reverse=True)  # best first
for beam in beams.sequences:
    assert abs(beam.score - beam.cumulative_logprob / len(beam.token_ids) ** 1.0) < 1e-5

input_ids = torch.tensor([llm.tokenizer.encode("Paging is")])
expected = reference_model.generate(
    input_ids,
    attention_mask=torch.ones_like(input_ids),
    do_sample=False,
    num_beams=3,
    num_return_sequences=3,
    max_new_tokens=8,
)
assert expected[:, input_ids.shape[1] :].tolist() == [
    beam.token_ids for beam in beams.sequences
]
print("transformers' beam search returns the same three beams")
assert llm.block_manager.device.num_free == 64  # every block came back

# %% [markdown]
# ## 5. Watching memory on a pool that is too small
#
# Now a pool of only **12 blocks** (48 token slots) and four requests: three greedy ones
# and a pair of samples (`n=2`), each with a prompt of 10 to 13 tokens and 12 tokens to
# generate (`ignore_eos=True`, so each generates exactly 12). At full length they would
# hold 28 blocks, so the engine must preempt. With `preemption_mode="swap"` a victim's
# blocks move to the host pool (12 blocks too, by default) and come back later
# ([replacement and recomputation](../../concepts/replacement-and-recomputation/)).
#
# `llm.step_stats` holds one row per step: the queues after scheduling, the pool after
# the step, and what moved. `util` is the share of the slots in used blocks that hold a
# token.

# %%
small = LLM("tiny-llama-docs", block_size=4, num_gpu_blocks=12, preemption_mode="swap")
requests = [
    ("The cat sat", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)),
    (
        "Paging is a",
        SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=3, ignore_eos=True),
    ),
    ("Hello, world", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)),
    ("Swap me out", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)),
]
for prompt, params in requests:
    small.add_request(prompt, params)

results = {}
print("step  run wait swap  tokens  used free shared  util  out  in copy  events")
while small.has_unfinished_requests():
    finished = small.step()
    row = small.step_stats[-1]
    events = [f"request {rid} preempted ({mode})" for rid, mode in row.preempted]
    for output in finished:
        results[output.request_id] = [c.token_ids for c in output.outputs]
        events.append(f"request {output.request_id} done")
    print(
        f"{row.step:4} {row.num_running:4} {row.num_waiting:4} {row.num_swapped:4}"
        f" {row.num_batched_tokens:7} {row.blocks_used:5} {row.blocks_free:4}"
        f" {row.blocks_shared:6} {row.kv_utilization:5.2f} {row.blocks_swapped_out:4}"
        f" {row.blocks_swapped_in:3} {row.blocks_copied:4}  {', '.join(events)}"
    )

# %% [markdown]
# Read the table from the top (the queues are counted at the end of each step):
#
# - **Step 0** admits requests 0, 1 and 2: 38 prompt tokens in one forward pass (request
#   1's second sample computes only its last token; it shares the rest). Request 3
#   waits: its 3 blocks do not fit in the 2 left.
# - **Step 1**: every sequence writes its first generated token. The last blocks of
#   requests 0 and 1 are full, so they need 3 new blocks, and 2 are free. The newest
#   running request, **2**, is swapped out (4 blocks to the host).
# - **Step 9**: the pool is full and request 0 needs a block. Now request **1** is the
#   newest running one, and both its samples go out together: 7 blocks, the 3 prompt
#   blocks they share moved once, and 2 of each sample's own. A request is preempted as
#   a whole.
# - **Steps 12 and 15**: swapped requests come back oldest first, each once its blocks
#   fit with a block to spare for each sequence's next token. Request 3 is admitted only
#   at step 15, in the step of the last swap-in: while any request is swapped out, no
#   new one starts ([thrashing and admission](../../concepts/thrashing-and-admission/)).

# %%
rows = small.step_stats
assert rows[0].num_batched_tokens == 12 + (12 + 1) + 13 and rows[0].num_waiting == 1
assert rows[1].preempted == [("2", "swap")] and rows[1].blocks_swapped_out == 4
# both samples
assert rows[9].preempted == [("1", "swap")] and rows[9].blocks_swapped_out == 3 + 2 * 2
# request 3 leaves the queue
admitted_at = next(row.step for row in rows if row.num_waiting == 0)
assert admitted_at == 15 and rows[admitted_at].blocks_swapped_in == 4
# it waited while a request was out
assert all(row.num_swapped > 0 for row in rows[1:admitted_at])
assert (
    max(row.blocks_used for row in rows) == 12
    and small.block_manager.device.num_free == 12
)

# %% [markdown]
# Preemption costs time, but it is invisible in the output. Swapping copies the K/V out
# and back bit for bit, and each sample's random generator does not care when it runs.
# The same requests on a pool large enough to never preempt give the same tokens:

# %%
roomy = LLM("tiny-llama-docs", block_size=4, num_gpu_blocks=64)
expected = roomy.generate(
    [p for p, _ in requests], [params for _, params in requests], use_tqdm=False
)
assert [[c.token_ids for c in out.outputs] for out in expected] == [
    results[str(i)] for i in range(4)
]
assert roomy.stats.num_preemptions == {"recompute": 0, "swap": 0}
print("same tokens with and without preemption")

# %% [markdown]
# ## 6. The memory report
#
# `llm.stats` adds up the whole run: the figures that the paper's experiments plot.

# %%
stats = small.stats
print(f"steps                         {stats.steps}")
print(f"generated tokens              {stats.generated_tokens}")
print(f"preemptions                   {stats.num_preemptions}")
print(
    "blocks swapped out / in       "
    f"{stats.blocks_swapped_out} / {stats.blocks_swapped_in}"
)
print(f"copy-on-write copies          {stats.cow_copies}")
print(
    f"peak blocks used              {stats.peak_blocks_used} "
    f"of {small.cache_config.num_gpu_blocks}"
)
print(f"mean KV utilization           {stats.mean_kv_utilization:.1%}")
print(f"most blocks saved by sharing  {stats.max_blocks_saved_by_sharing}")
assert stats.generated_tokens == 5 * 12  # five sequences, 12 tokens each
assert stats.num_preemptions == {"recompute": 0, "swap": 2}
# everything that left came back
assert stats.blocks_swapped_out == stats.blocks_swapped_in == 11
assert stats.max_blocks_saved_by_sharing == 3  # the pair's 3 prompt blocks, held twice
# that prompt fills its blocks: the samples never share a partial one
assert stats.cow_copies == 0
# paging wastes at most the last, partly filled block
assert stats.mean_kv_utilization > 0.9

# %% [markdown]
# The mean KV utilization is the share of the slots in used blocks that hold a token. It
# is above 90% even in this cramped run: the only waste is the unfilled tail of each
# sequence's last block, at most 3 slots of 4 here. The paper measures 20-38% for
# systems that reserve a contiguous region per request ([why the KV cache is a memory
# problem](../../concepts/kv-cache/)).
#
# ## What next
#
# - [Scheduling](../../concepts/scheduling/), [replacement and
#   recomputation](../../concepts/replacement-and-recomputation/), [thrashing and
#   admission](../../concepts/thrashing-and-admission/) and [process
#   trees](../../concepts/process-trees/) explain the policies you watched here, each
#   with an exercise checked against the code.
# - Try `preemption_mode="recompute"` in section 5: the victims go back to the waiting
#   queue and recompute their prompt and their output in one prefill (watch the `tokens`
#   column), and the tokens are still the same.

# %% [markdown]
# ## 7. Chunked prefill: a long prompt in slices
#
# With `enable_chunked_prefill=True` a prompt gets at most what the step's token budget
# leaves after the decodes, as a round-robin scheduler gives a long job a quantum ([time
# slicing: chunked prefill](../../concepts/chunked-prefill/)). Below, a short request is
# decoding when a 60-token prompt arrives. With a budget of 8 tokens a step, the long
# prompt is computed 7 tokens at a time, and the short request never misses a step.

# %%
sliced = LLM(
    "tiny-llama-docs",
    block_size=4,
    num_gpu_blocks=64,
    enable_chunked_prefill=True,
    max_num_batched_tokens=8,
    max_num_seqs=2,
)
short_id = sliced.add_request(
    "The cat", SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
)
sliced.step()  # the short prompt, and its first token
long_prompt = "Paging splits the cache into blocks reached through a table."
long_params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
long_id = sliced.add_request(long_prompt, long_params)
print("step  tokens  of which prompt  short request's tokens so far")
sliced_tokens = {}
while sliced.has_unfinished_requests():
    for output in sliced.step():
        sliced_tokens[output.request_id] = output.outputs[0].token_ids
    row = sliced.step_stats[-1]
    short = sliced.request_output(short_id)
    done = len(short.outputs[0].token_ids) if short else len(sliced_tokens[short_id])
    print(
        f"{row.step:4} {row.num_batched_tokens:7} {row.num_prefill_tokens:16} {done:9}"
    )
    assert row.num_batched_tokens <= 8  # the budget holds at every step
# the long prompt took slices, and still gets the tokens of one whole prefill
(whole,) = llm.generate(long_prompt, long_params, use_tqdm=False)
assert sliced_tokens[long_id] == whole.outputs[0].token_ids
print("same tokens as a prompt computed in one step")

# %% [markdown]
# The `of which prompt` column shows the long prompt's slices, 7 tokens each beside
# the short request's decode. Its first token comes out once its last slice has run.
# Meanwhile the short request gains one token at every step.

# %% [markdown]
# ## 8. Serving online
#
# `generate` serves prompts known in advance. `minipaged serve` serves clients that come
# and go: an HTTP server that speaks OpenAI's `/v1/completions`, with **one** engine
# loop in a background thread that runs every connection's requests in the same batches
# ([serving online](../../engine/serving-online/)). `running_server` starts it on a free
# port for the length of a `with` block; the official `openai` client then talks to it
# as it would to OpenAI. `top_k` and `ignore_eos` are vLLM's extras: they go in
# `extra_body`.

# %%
import openai

from minipaged.serving import running_server

server_llm = LLM("tiny-llama-docs", block_size=4, num_gpu_blocks=64, max_step_stats=16)
with running_server(server_llm) as url:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    completion = client.completions.create(
        model="tiny-llama-docs", prompt="The cat sat", max_tokens=8, temperature=0
    )  # the request of section 2's first prompt, with the `greedy` parameters
    print(
        f"{url}: {completion.choices[0].text!r}, "
        f"{completion.usage.completion_tokens} tokens"
    )
    stream = client.completions.create(
        model="tiny-llama-docs",
        prompt="Paging is",
        max_tokens=8,
        temperature=0.8,
        seed=1,
        stream=True,
        extra_body={"top_k": 50, "ignore_eos": True},
    )
    pieces = [chunk.choices[0].text for chunk in stream]
    print("streamed:", pieces)
# the same greedy tokens as generate
assert completion.choices[0].text == outputs[0].outputs[0].text
# the server stopped: every block is back
assert server_llm.block_manager.device.num_free == 64

# %% [markdown]
# ## 9. Two ranks: tensor parallelism
#
# `tensor_parallel_size=2` splits the model over two processes, as Megatron-LM does:
# each rank computes half of the attention heads, and keeps the K/V of its heads in its
# own pools. The pools have the same blocks, so the one set of block tables, on rank 0,
# serves both ([one page table, many memories](../../concepts/tensor-parallel/)). On
# this CPU the engine starts the second rank itself and talks to it with gloo. Each
# step, rank 0 broadcasts the step's inputs, and the two halves of every layer meet in
# an all-reduce. `with` stops the worker at the end.

# %%
with LLM(
    "tiny-llama-docs", block_size=4, num_gpu_blocks=64, tensor_parallel_size=2
) as tp:
    tp_outputs = tp.generate(prompts, greedy, use_tqdm=False)
    for pool in tp.runner.pools():
        print(
            f"rank {pool['rank']}: {pool['kv_heads']} KV head(s), pool shape "
            f"{pool['shape']}, {pool['bytes']:,} bytes"
        )
    sent = tp.runner.last_step
    print(
        f"last step: {sent.broadcast_bytes:,} bytes broadcast, "
        f"{sent.allreduce_calls} all-reduces of {sent.allreduce_bytes:,} bytes in all"
    )
# two ranks, the same tokens as one
assert [o.outputs[0].token_ids for o in tp_outputs] == [
    o.outputs[0].token_ids for o in outputs
]
# the last step decoded 3 tokens: 2 all-reduces a layer of 3 hidden states in fp32
layers, hidden = llm.model.config.num_hidden_layers, llm.model.config.hidden_size
assert sent.allreduce_calls == 2 * layers
assert sent.allreduce_bytes == 2 * layers * 3 * hidden * 4

# %% [markdown]
# The model has 2 KV heads, so each rank's pools hold 1: half the bytes of one rank's.
# The broadcast is a few kilobytes: the step's tokens and positions, and a few integers
# of block table a sequence. The all-reduces carry hidden states: they grow with the
# step's tokens, not with the length of the context.
