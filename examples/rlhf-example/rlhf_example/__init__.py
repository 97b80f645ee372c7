"""rlhf-example: the plugin built step by step in the README's "Writing a plugin" tutorial."""
