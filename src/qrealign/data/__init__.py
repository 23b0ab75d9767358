"""qrealign data layer: the project's prompt sets, response templates and an offline task.

Nothing here imports torch or transformers.
"""

from .prompts import (
    BENIGN_CATEGORIES,
    HARM_CATEGORIES,
    HELD_OUT_SETS,
    SPLITS,
    SUPPLEMENTS,
    held_out_texts,
    load_held_out,
    load_prompt_file,
    load_prompts,
    load_supplement,
    load_twin_pairs,
    normalize_prompt,
    prompt_set_fingerprint,
)
from .responses import (
    COMPLIANCE_TEMPLATES,
    PLACEHOLDER,
    PLACEHOLDER_MARKERS,
    REFUSAL_TEMPLATES,
    compliance_placeholder_for,
    refusal_for,
)
from .topic_task import CODE_WORDS, TOPICS, TopicCodeTask
from .types import Prompt, TaskExample

__all__ = [
    "Prompt",
    "TaskExample",
    "SPLITS",
    "SUPPLEMENTS",
    "HELD_OUT_SETS",
    "HARM_CATEGORIES",
    "BENIGN_CATEGORIES",
    "load_prompts",
    "load_twin_pairs",
    "load_supplement",
    "load_held_out",
    "held_out_texts",
    "load_prompt_file",
    "prompt_set_fingerprint",
    "normalize_prompt",
    "refusal_for",
    "compliance_placeholder_for",
    "PLACEHOLDER",
    "PLACEHOLDER_MARKERS",
    "REFUSAL_TEMPLATES",
    "COMPLIANCE_TEMPLATES",
    "TopicCodeTask",
    "TOPICS",
    "CODE_WORDS",
]
