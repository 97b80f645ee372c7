"""Built-in PPO: rollouts, advantage estimators, KL control, the clipped loss and the stage."""
