"""Feedback records, loaders, validation, conversions, tokenization and collators."""

from prefkit.data.records import (
    RECORD_TYPES,
    DataError,
    PairwiseRecord,
    RankedRecord,
    RatedRecord,
    Record,
    StepwiseRecord,
    UnpairedRecord,
    record_to_dict,
)

__all__ = [
    "RECORD_TYPES",
    "DataError",
    "PairwiseRecord",
    "RankedRecord",
    "RatedRecord",
    "Record",
    "StepwiseRecord",
    "UnpairedRecord",
    "record_to_dict",
]
