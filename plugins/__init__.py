"""Built-in plugins: ordinary pluggy plugins registered by ``rlhf_core.plugins.BUILTINS``."""
