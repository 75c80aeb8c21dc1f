"""Typed configuration: one dataclass per component, a YAML recipe plus overrides per run.

The section modules are imported lazily by ``run``: importing one section (e.g. from a
reward worker) must not pull in the others.
"""

from megatron_rl.config.base import apply_override, field_docs, from_dict, to_dict

__all__ = ["apply_override", "field_docs", "from_dict", "to_dict"]
