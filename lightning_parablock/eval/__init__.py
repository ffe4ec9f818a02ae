"""Evaluation: GSM8K-style exact-match accuracy, token perplexity, and MT-Bench answers for FastChat's judge."""

from lightning_parablock.eval.answers import answers_match, extract_numeric_answer, extract_reference_answer
from lightning_parablock.eval.generation import encode_prompt, generate_answers, generate_from_ids
from lightning_parablock.eval.gsm8k import GSM8KAccuracy, GSM8KEvaluation, GSM8KResult
from lightning_parablock.eval.mtbench import (
    answer_mtbench,
    conversation_prompt,
    export_mtbench_answers,
    load_mtbench_questions,
    write_jsonl_atomic,
)
from lightning_parablock.eval.perplexity import TokenPerplexity, evaluate_perplexity

__all__ = [
    "GSM8KAccuracy",
    "GSM8KEvaluation",
    "GSM8KResult",
    "TokenPerplexity",
    "answer_mtbench",
    "answers_match",
    "conversation_prompt",
    "encode_prompt",
    "evaluate_perplexity",
    "export_mtbench_answers",
    "extract_numeric_answer",
    "extract_reference_answer",
    "generate_answers",
    "generate_from_ids",
    "load_mtbench_questions",
    "write_jsonl_atomic",
]
