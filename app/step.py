"""What one step sends down the pipeline: a route's rows turned into `PipelineClient.step`'s arguments."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from app.pipeline import step_inputs
from app.sampling import sampling_spec
from app.sequence import WANT_SAMPLE, Row
from stages.sampler import SamplingSpec


@dataclass(frozen=True)
class StepArgs:
    """A step's tensors and per-row fields (see `app.pipeline.PipelineClient.step`)."""

    inputs: torch.Tensor
    tables: list[list[list[int]]]
    starts: list[int]
    num_new: list[int]
    all_logits: bool
    want: tuple[int, ...]
    sampling: tuple[SamplingSpec | None, ...]
    scoring: tuple
    copies: list[list[tuple[int, int]]]
    adapters: tuple[int, ...]

    def kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def build_step(rows: list[Row], route: tuple[str, ...]) -> StepArgs:
    """The step of `rows` on `route`: their pending tokens (packed into one row when their lengths
    differ, unless every position's logits come back), their blocks on each stage, what each wants
    back and how it samples, the prompt positions an echo scores, the blocks to copy first, and
    each row's LoRA adapter."""
    all_logits = any(row.seq.needs_all_logits for row in rows)
    packed = len({row.num_new for row in rows}) > 1 and not all_logits
    want = tuple(row.want for row in rows)
    return StepArgs(
        inputs=step_inputs([row.seq.tokens[row.start:row.start + row.num_new] for row in rows], packed),
        tables=[[row.seq.tables[stage].blocks for row in rows] for stage in range(len(route))],
        starts=[row.start for row in rows], num_new=[row.num_new for row in rows], all_logits=all_logits, want=want,
        sampling=tuple(sampling_spec(row.seq, row.start, row.num_new, route) if w == WANT_SAMPLE else None
                       for row, w in zip(rows, want)),
        # an echo's prompt is scored on the last stage: each position's next prompt token
        scoring=tuple((r.seq.params.logprobs or 0, tuple(r.seq.prompt_ids[r.start + 1:r.start + r.num_new + 1]))
                      if r.seq.needs_all_logits else None for r in rows) if all_logits else (),
        # blocks a beam shares with another, copied before the step writes into them
        copies=[[pair for row in rows if row.copies for pair in row.copies[stage]] for stage in range(len(route))],
        adapters=tuple(row.seq.adapter for row in rows))
