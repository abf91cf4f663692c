"""Reward distillation (`alambic reward-distill`): see alambic.reward.distill for why it has its own small loop."""
