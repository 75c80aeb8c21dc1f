"""The Megatron actor: model stages, optimizer, log-probs and the train step."""
