"""Training: the token-pruning env, the SB3 policy, per-token-credit PPO, rollouts, callbacks, tracking."""
