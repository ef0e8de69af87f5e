"""Config machinery every layer uses: typed dataclasses from dicts (`fields`), config files
(`files`) and command-line overrides (`overrides`). It imports nothing else of vlm_jax but
`errors`; the run's schema, `RunConfig`, is composed in `vlm_jax/train/run_config.py` from the
configs each part owns (VLMConfig in models/, DataConfig in data/, ...)."""
from vlm_jax.config.fields import dataclass_in, from_dict, to_dict
from vlm_jax.config.files import load_config_file, load_module
from vlm_jax.config.overrides import apply_overrides, parse_arg, suggestion

__all__ = ["apply_overrides", "dataclass_in", "from_dict", "load_config_file", "load_module",
           "parse_arg", "suggestion", "to_dict"]
