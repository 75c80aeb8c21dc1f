"""Memory and step-time planner: will a recipe fit a cluster, and how long will a step take?

Pure arithmetic over the recipe (``RunConfig``), the model's dimensions (``models``) and a GPU
table (``hardware``); nothing here touches a GPU. ``memory`` holds the per-GPU byte formulas,
``timing`` the step-time estimate, ``planner`` puts them together and searches for the
smallest change that makes a recipe fit.
"""

from megatron_rl.plan.hardware import GPUS, GpuSpec
from megatron_rl.plan.models import KNOWN_MODELS, ModelDims, resolve_dims
from megatron_rl.plan.planner import Plan, plan, plan_with_fix

__all__ = ["GPUS", "GpuSpec", "KNOWN_MODELS", "ModelDims", "Plan", "plan", "plan_with_fix", "resolve_dims"]
