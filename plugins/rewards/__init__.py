"""Built-in rewards beyond the reward model: verifiable ones (``math``, ``exact_match``,
``format``), ``code`` (tests run in a sandboxed process), ``remote`` (an HTTP reward service)
and ``judge`` (a generative judge from a local causal LM). Each module is its own plugin."""
