"""The oracle: slow, obviously-correct generation for one sequence.

Every step recomputes the whole sequence without a KV cache, so there is nothing to get wrong; the
batching engine (`model.engine`) is tested against it token for token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.sampling import SamplingParams, make_generator, sample_next
from model.transformer import Transformer


@torch.inference_mode()
def generate(model: Transformer, prompt_ids: Sequence[int], params: SamplingParams,
             stop_ids: Sequence[int] = ()) -> list[int]:
    """Generate up to params.max_tokens ids after prompt_ids; stops after emitting a stop id
    (stop_ids + params.stop_token_ids, unless ignore_eos), which is included in the result."""
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(stop_ids))
    generator = make_generator(params, model.device)
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(params.max_tokens):
        tokens = torch.tensor([ids], device=model.device)
        logits = model(tokens)[0, -1]  # (V,)
        banned = sorted(stops) if len(out) < params.min_tokens else ()
        token = sample_next(logits, params, generator, prompt_ids, out, banned)
        out.append(token)
        ids.append(token)
        if token in stops:
            break
    return out
