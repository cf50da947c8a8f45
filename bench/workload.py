"""The benchmark workload shared by every script in bench/: the 16 load prompts the peer figures in
`../shared/peers/results.md` were measured with (one user message each, through the chat template),
and small statistics helpers."""

from __future__ import annotations

import statistics

LOAD_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works, step by step.",
    "Describe the water cycle to a ten-year-old.",
    "Give me a detailed plan for learning to play the guitar in three months.",
    "Write a letter to a friend describing your last vacation at the beach.",
    "What are the main causes of the French Revolution? Explain in detail.",
    "Explain the difference between a virus and a bacterium.",
    "Write a product description for a new reusable water bottle.",
    "Describe how a computer processes a keystroke, from the keyboard to the screen.",
    "Write a short poem about autumn leaves and then explain its meaning.",
    "List ten tips for staying productive while working from home and explain each one.",
    "Explain why the sky is blue.",
    "Tell me about the history of the bicycle.",
    "Write a recipe for a simple vegetable soup with step-by-step instructions.",
    "Describe a day in the life of a honeybee.",
    "Explain what machine learning is and give three everyday examples.",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
