"""Compliance and openness artefacts (SPEC §9): run manifests and their verification, model and data cards with the
EU AI Act public summary, retrospective opt-out removal from built datasets, and the PII output filter."""

from .cards import write_cards
from .manifest import record, record_data_build, record_training_run, verify, write_run_manifest
from .optout import apply_optout, check
from .output_filter import PIIFilter, filter_deltas, make_hash_list, redact

__all__ = ["PIIFilter", "apply_optout", "check", "filter_deltas", "make_hash_list", "record", "record_data_build",
           "record_training_run", "redact", "verify", "write_cards", "write_run_manifest"]
