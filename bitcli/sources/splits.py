"""Split names: the one table of the words every source reads as train, validation and test. Class folders
(DATA/train beside DATA/val), a label file's split column, FILE:SPLIT, parquet shard and folder names,
save_to_disk splits and hf://...:SPLIT all map a name through it, in any case.

The words are Hugging Face `datasets`' split keywords (its data_files module), so that a data set laid out for
`datasets` is read the same way here: `dev` is validation, `eval` and `evaluation` are test.
"""

from __future__ import annotations

# split -> its words; within a split the first word wins where a folder holds two (val/ before valid/).
SPLIT_KEYWORDS: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "validation": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}


def canonical_split(name: str) -> str | None:
    """'val' -> 'validation', 'Training' -> 'train', 'dev' -> 'validation'; None for other names."""
    lowered = name.lower()
    return next((split for split, words in SPLIT_KEYWORDS.items() if lowered in words), None)
