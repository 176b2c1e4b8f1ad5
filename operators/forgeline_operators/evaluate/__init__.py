"""The ``evaluate`` operator: score a model on a dataset and enforce quality gates on the numbers.

It owns the evaluation metrics (perplexity and next-token accuracy over completion tokens, greedy
exact match for sft data), the optional side-by-side evaluation of a baseline model on the same rows,
the gate checks that fail a workflow with the measured numbers in the message, and the ``report``
output (``metrics.json`` + per-row ``samples.jsonl``). Tokenisation comes from
:mod:`forgeline_operators.data`, shared with fine-tuning.
"""
