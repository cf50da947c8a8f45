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


# ------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """python -m model.generate [--checkpoint DIR] [--temperature T] [--max-tokens N] [--seed S] "message" """
    import argparse
    import sys

    from model.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
    from model.sampling import SamplingError
    from model.tokenizer import render_chat

    parser = argparse.ArgumentParser(prog="python -m model.generate",
                                     description="Print one assistant reply from a checkpoint (slow oracle path).")
    parser.add_argument("message", help="the user message")
    parser.add_argument("--checkpoint", type=str, default=None,
                        help="checkpoint directory (default: the SmolLM2-135M-Instruct default model)")
    parser.add_argument("--system", default=None, help="system prompt (default: the tokenizer's own, if any)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        ckpt = load_checkpoint(resolve_checkpoint(args.checkpoint))
    except (SamplingError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
        [{"role": "user", "content": args.message}]
    prompt = render_chat(ckpt.tokenizer, messages).ids
    out = generate(ckpt.model, prompt, params, stop_ids=sorted(ckpt.tokenizer.stop_ids))
    print(ckpt.tokenizer.decode(out, skip_special=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
