"""One step of Model Runner V2 around the forward: execute_model's CPU half (up to prepare_inputs, which returns the
step's InputBatch), the batch descriptors it runs under, and sample_tokens' last-stage half (sample, then the
post-sampling state update).

execute_model before the forward (the same order in every version; line numbers per version):
  0.32.0 model_runner.py:1730-1737, 1743-1744, 1812   0.33.0 :1775-1786, 1795-1796, 1862
  0.34.0 :1838-1849, 1865-1867, 1924-1926 (0.34 first calls draft_tokens_handler.begin_step, :1838)
sample_tokens after the forward: `self.sample(hidden_states, input_batch, grammar_output)` then
`self.postprocess_sampled(idx_mapping, sampled_token_ids, num_sampled, num_rejected, query_start_loc)`
(0.32.0 :2217, 0.33.0 :2286, 0.34.0 :2350) and, with a speculator, the drafts written to
`req_states.draft_tokens[idx_mapping]` (0.32.0 :2257, 0.33.0 :2326, 0.34.0 :2390).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from vllm.config.compilation import CUDAGraphMode
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor
from vllm.v1.worker.gpu.input_batch import InputBatch
from vllm.v1.worker.gpu.model_runner import GPUModelRunner


def eager(num_tokens: int) -> BatchExecutionDescriptor:
    """What dispatch_cg_and_sync_dp gives an eager (or unmatched) batch: no request padding (num_reqs None)."""
    return BatchExecutionDescriptor(cg_mode=CUDAGraphMode.NONE, num_tokens=num_tokens, num_reqs=None)


def full_graph(num_reqs: int, num_tokens: int | None = None, query_len: int = 1) -> BatchExecutionDescriptor:
    """A FULL CUDA graph captured for `num_reqs` uniform decodes of `query_len` tokens: a smaller decode batch
    dispatched to it is padded with empty requests up to `num_reqs` (prepare_inputs, 0.34.0 :1532-1537)."""
    return BatchExecutionDescriptor(
        cg_mode=CUDAGraphMode.FULL,
        num_tokens=num_tokens if num_tokens is not None else num_reqs * query_len,
        num_reqs=num_reqs,
        uniform_token_count=query_len,
        max_query_len=query_len,
    )


def execute_cpu_half(
    runner: GPUModelRunner, out: SchedulerOutput, desc: BatchExecutionDescriptor | None = None
) -> InputBatch:
    """What execute_model runs before the forward, for a real (non-dummy) step: the request-state updates, the
    batch gather (decode-first sort) and prepare_inputs. `desc` defaults to eager."""
    handler = getattr(runner, "draft_tokens_handler", None)
    if handler is not None and hasattr(handler, "begin_step"):  # 0.34.0 :1838
        handler.begin_step(out)
    runner.update_pp_decode_requests()
    runner.finish_requests(out)
    runner.free_states(out)
    runner.add_requests(out)
    runner.update_requests(out)
    runner.block_tables.apply_staged_writes()
    batch_state, _uniform = runner.gather_batch_req_state(out, False)
    return runner.prepare_inputs(out, batch_state, desc or eager(batch_state.num_tokens), 0)


class Sampled(NamedTuple):
    tokens: dict[str, list[int]]  # req_id -> tokens sampled this step ([] for a chunk mid-prefill)
    output: Any  # vLLM's SamplerOutput


def sample(runner: GPUModelRunner, batch: InputBatch, logits: torch.Tensor) -> Sampled:
    """sample_tokens' sampling half on the step's logits ([num logits rows, vocab], in batch row order): vLLM's
    GPUModelRunner.sample (rows picked at logits_indices, Sampler or RejectionSampler) and postprocess_sampled
    (last sampled tokens, computed-token counts, token history). The model is the identity on "hidden states",
    so the logits rows are placed at the batch's logits_indices."""
    hidden = torch.zeros(batch.num_tokens_after_padding, logits.shape[1], dtype=logits.dtype)
    hidden[batch.logits_indices] = logits
    output, num_sampled, num_rejected = runner.sample(hidden, batch, None)
    runner.postprocess_sampled(
        batch.idx_mapping, output.sampled_token_ids, num_sampled, num_rejected, batch.query_start_loc
    )
    tokens = {
        req_id: output.sampled_token_ids[i, : int(num_sampled[i])].tolist()
        for i, req_id in enumerate(batch.req_ids[: batch.num_reqs])
    }
    return Sampled(tokens, output)


def write_drafts(runner: GPUModelRunner, drafts: Mapping[str, Sequence[int]]) -> None:
    """Stand-in for the speculator's propose (needs a draft model): the drafts each request's next step verifies,
    written where sample_tokens writes them (req_states.draft_tokens, by request slot)."""
    for req_id, tokens in drafts.items():
        row = torch.tensor(list(tokens), dtype=runner.req_states.draft_tokens.dtype)
        runner.req_states.draft_tokens[runner.req_states.req_id_to_index[req_id], : len(row)] = row


def one_hot_logits(vocab_size: int, wanted: Sequence[int], margin: float = 20.0) -> torch.Tensor:
    """Logits whose row i makes `wanted[i]` the sure pick (greedy or random sampling alike)."""
    rows = len(wanted)
    logits = torch.zeros(rows, vocab_size, dtype=torch.float32)
    logits[torch.arange(rows), torch.tensor(list(wanted))] = margin
    return logits
