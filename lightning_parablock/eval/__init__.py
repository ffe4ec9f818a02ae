"""Evaluation: accuracy on your own chat data, GSM8K-style exact-match accuracy, lm-evaluation-harness tasks, token
perplexity, and MT-Bench answers for FastChat's judge."""

from lightning_parablock.data.prompts import conversation_prompt
from lightning_parablock.eval.accuracy import MatchAccuracy
from lightning_parablock.eval.answers import answers_match, extract_numeric_answer, extract_reference_answer
from lightning_parablock.eval.chat_answers import (
    AnswerMatch,
    ChatEvaluation,
    ChatExample,
    ChatScore,
    answer_conversations,
    load_chat_examples,
    score_chat,
)
from lightning_parablock.eval.generation import (
    cut_at_stop,
    encode_prompt,
    generate_answers,
    generate_from_ids,
    generate_token_ids,
)
from lightning_parablock.eval.global_model import GlobalModelEvaluation
from lightning_parablock.eval.gsm8k import GSM8KAccuracy, GSM8KEvaluation, GSM8KResult
from lightning_parablock.eval.harness import LMEvalHarness, LMEvalResult, evaluate_with_lm_eval, write_local_task
from lightning_parablock.eval.mtbench import (
    FASTCHAT_TEMPERATURES,
    answer_mtbench,
    export_mtbench_answers,
    fastchat_output,
    load_mtbench_questions,
    question_temperature,
    write_jsonl_atomic,
)
from lightning_parablock.eval.perplexity import TokenPerplexity, evaluate_perplexity

__all__ = [
    "AnswerMatch",
    "ChatEvaluation",
    "ChatExample",
    "ChatScore",
    "MatchAccuracy",
    "answer_conversations",
    "load_chat_examples",
    "score_chat",
    "FASTCHAT_TEMPERATURES",
    "GSM8KAccuracy",
    "GSM8KEvaluation",
    "GSM8KResult",
    "GlobalModelEvaluation",
    "LMEvalHarness",
    "LMEvalResult",
    "TokenPerplexity",
    "answer_mtbench",
    "answers_match",
    "conversation_prompt",
    "cut_at_stop",
    "encode_prompt",
    "evaluate_perplexity",
    "evaluate_with_lm_eval",
    "export_mtbench_answers",
    "extract_numeric_answer",
    "extract_reference_answer",
    "fastchat_output",
    "generate_answers",
    "generate_from_ids",
    "generate_token_ids",
    "load_mtbench_questions",
    "question_temperature",
    "write_jsonl_atomic",
    "write_local_task",
]
