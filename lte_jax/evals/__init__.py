"""Retrieval evaluations (EVALS.md): S-NIAH, MQAR, EVAPORATE-style; cache memory."""
from lte_jax.evals.memory import cache_bytes_per_sequence
from lte_jax.evals.metrics import contains_any, mqar_accuracy, substring_match
