"""Split names: the one table of the words every source reads as train, validation and test. Class folders
(DATA/train beside DATA/val), a label file's split column, FILE:SPLIT, parquet shard and folder names,
save_to_disk splits and hf://...:SPLIT all map a name through it, in any case.

The words are Hugging Face `datasets`' split keywords (its data_files module), so that a data set laid out for
`datasets` is read the same way here: `dev` is validation, `eval` and `evaluation` are test.
"""

from __future__ import annotations

from collections.abc import Collection

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


# ----------------------------------------------------------------------------------------------------------
# Which split is used: the one rule of every source (a class folder, a label file's split column, parquet
# shards, a DatasetDict, a Hub data set), as a train/ beside a val/ folder is used. `present` holds the split
# keys a source has; None stands for rows without a split (an unsplit source).


class MissingSplit(Exception):  # the caller says what is missing, in its source's words
    """The source has splits, but not the one needed: `split` ("train", or "validation" for `bit eval`)."""

    def __init__(self, split: str) -> None:
        super().__init__(split)
        self.split = split


def training_splits(present: Collection[str | None]) -> tuple[str | None, str | None]:
    """(the split trained on, the split validated on or None). An unsplit source is all training data
    (None, None); a split source needs a train split (else MissingSplit) and validates on its validation
    split, if any. A test split is never used."""
    if None in present:
        return None, None
    if "train" not in present:
        raise MissingSplit("train")
    return "train", "validation" if "validation" in present else None


def evaluation_split(present: Collection[str | None]) -> str | None:
    """The split `bit eval` evaluates: every row of an unsplit source (None); else the validation split; else
    the only split (as DATA/val alone is evaluated); else MissingSplit: a train split, or several splits, and
    no validation split. A test split beside another split is used only when named (FILE:test)."""
    if None in present:
        return None
    if "validation" in present:
        return "validation"
    if "train" in present or len(present) != 1:
        raise MissingSplit("validation")
    return next(iter(present))
