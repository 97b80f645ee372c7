"""rlhf-example: the plugin built step by step in the "Writing plugins" tutorial (docs/plugins.md)."""
