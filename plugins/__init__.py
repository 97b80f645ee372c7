"""Built-in plugins: ordinary pluggy plugins registered by ``rlhf_core.plugin_system.manager.BUILTINS``."""
