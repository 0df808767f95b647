"""Evaluation: how good a compressed model is, measured on the artifact users ship.

``scoring`` turns a torch model or an exported bundle into one interface
(log-probabilities of token sequences); ``perplexity`` computes the standard
sliding-window perplexity on top of it.
"""

from llmshrink.evaluation.perplexity import PerplexityResult, perplexity
from llmshrink.evaluation.scoring import Scorer, load_scorer

__all__ = ["PerplexityResult", "Scorer", "load_scorer", "perplexity"]
