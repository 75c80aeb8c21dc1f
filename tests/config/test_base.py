"""Config machinery: strict loading, overrides, closest-key errors, layout checks."""

from dataclasses import dataclass, field

import pytest

from megatron_rl.config.base import apply_override, field_docs, from_dict, to_dict
from megatron_rl.config.optimizer import OptimizerConfig
from megatron_rl.config.parallel import ParallelConfig, check_layout
from megatron_rl.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-6
    """Learning rate."""
    mode: str = "a"
    """A mode."""


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    """The inner section."""
    sizes: list[int] = field(default_factory=list)
    """Some sizes."""
    name: str | None = None
    """Optional name."""


def test_field_docs_read_from_source():
    assert field_docs(Inner) == {"lr": "Learning rate.", "mode": "A mode."}
    docs = field_docs(OptimizerConfig)
    assert set(docs) == {f for f in OptimizerConfig.__dataclass_fields__}


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"`inner.lrr`.*did you mean `lr`"):
        from_dict(Outer, {"inner": {"lrr": 1.0}})


def test_types_checked_and_ints_widen_to_float():
    cfg = from_dict(Outer, {"inner": {"lr": 1}, "sizes": [1, 2]})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    with pytest.raises(ConfigError, match=r"`inner.lr` must be of type float.*Learning rate"):
        from_dict(Outer, {"inner": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"`sizes\[1\]`"):
        from_dict(Outer, {"sizes": [1, "x"]})


def test_overrides_parse_yaml_values_and_reject_typos():
    tree: dict = {}
    apply_override(tree, Outer, "inner.lr=3e-6")
    apply_override(tree, Outer, "sizes=[4, 8]")
    apply_override(tree, Outer, "name=null")
    cfg = from_dict(Outer, tree)
    assert cfg.inner.lr == 3e-6 and cfg.sizes == [4, 8] and cfg.name is None
    with pytest.raises(ConfigError, match="did you mean `inner`"):
        apply_override({}, Outer, "iner.lr=1")
    with pytest.raises(ConfigError, match="has no `=`"):
        apply_override({}, Outer, "inner.lr")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_override({}, Outer, "name.x=1")
    assert to_dict(cfg) == {"inner": {"lr": 3e-6, "mode": "a"}, "sizes": [4, 8], "name": None}


def test_post_init_validation_surfaces_with_section_path():
    with pytest.raises(ConfigError, match="optimizer.lr` must be > 0"):
        from_dict(OptimizerConfig, {"lr": -1.0}, "optimizer")
    with pytest.raises(ConfigError, match="sequence parallel"):
        ParallelConfig(tp=1, sp=True)


@pytest.mark.parametrize(
    "par, world, dims, match",
    [
        (ParallelConfig(tp=2, pp=2), 6, {}, "world size 6 is not divisible by tp\\*pp\\*cp"),
        (ParallelConfig(tp=4), 4, {"num_heads": 6}, "6 attention heads do not split over tp=4"),
        (ParallelConfig(tp=4), 4, {"num_heads": 8, "num_kv_heads": 2}, "2 key/value heads"),
        (ParallelConfig(pp=3, num_microbatches=3), 3, {"num_layers": 4}, "4 layers do not split"),
        (ParallelConfig(cp=2), 2, {"seq_len": 30}, "not divisible by 2\\*cp = 4"),
        (ParallelConfig(pp=4, num_microbatches=2), 4, {}, "num_microbatches=2 is below pp=4"),
    ],
)
def test_impossible_layouts_are_refused_with_a_fix(par, world, dims, match):
    with pytest.raises(ConfigError, match=match):
        check_layout(par, world, **dims)


def test_valid_layout_returns_dp_size():
    par = ParallelConfig(tp=2, pp=2, num_microbatches=4)
    assert check_layout(par, 8, num_heads=4, num_kv_heads=2, num_layers=4, seq_len=64) == 2
