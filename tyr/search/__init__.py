"""Torch-free search core: the allocation space, the budget-preserving mutation, and the staged
(1 + lambda) evolution. Only numpy and the standard library (plus tqdm for an optional bar)."""

from tyr.search.evolution import EvolutionConfig, EvolutionResult, Stage, evolve
from tyr.search.space import Allocation, SearchSpace, mutate

__all__ = ["Allocation", "SearchSpace", "mutate", "Stage", "EvolutionConfig", "EvolutionResult", "evolve"]
