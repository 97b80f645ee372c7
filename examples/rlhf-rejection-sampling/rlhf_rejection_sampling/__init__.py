"""Rejection-sampling fine-tuning as a third-party rlhf stage (see stage.py)."""
