"""Models: resolve what the user names, load it, describe it, and feed it text.

Data enters as a string (``--model``, ``--calib-data``) and leaves as HF
objects (config, tokenizer, ``PreTrainedModel``), a :class:`ModelInfo`, or
:class:`TokenSplits`. Heavy libraries (torch, transformers) are imported
inside functions so that importing this package stays instant.
"""

from llmshrink.models.arch import ARCHITECTURES, ArchSupport, check_supported
from llmshrink.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL, BuiltinModel, ensure_builtin
from llmshrink.models.data import DataSpec, TokenSplits, parse_data_spec, token_splits
from llmshrink.models.info import ModelInfo, count_params, model_info
from llmshrink.models.load import load_config, load_model, load_tokenizer, local_dir
from llmshrink.models.resolve import ModelSource, resolve_model

__all__ = [
    "ARCHITECTURES", "ArchSupport", "check_supported",
    "BUILTIN_MODELS", "DEFAULT_MODEL", "BuiltinModel", "ensure_builtin",
    "DataSpec", "TokenSplits", "parse_data_spec", "token_splits",
    "ModelInfo", "count_params", "model_info",
    "load_config", "load_model", "load_tokenizer", "local_dir",
    "ModelSource", "resolve_model",
]
