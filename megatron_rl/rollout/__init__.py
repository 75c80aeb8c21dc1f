"""Rollout: SGLang servers over HTTP, the embedded CPU engine that serves the same API.

Layer rule: nothing here imports megatron-core, the actor or the trainer (servers must
start without them); SGLang itself is only ever launched as a subprocess. Import the
submodules you need (``megatron_rl.rollout.client``, ``.servers``, ``.engine``); this
package only re-exports the contract types, so importing it stays cheap.
"""

from megatron_rl.rollout.types import FinishReason, RolloutRequest, Sample, SamplingParams

__all__ = ["FinishReason", "RolloutRequest", "Sample", "SamplingParams"]
