"""Built-in offline preference optimisation: the policy learns from fixed preference data, with no
reward model and no sampling. ``losses.py`` holds the losses as pure functions on sequence
log-probs (family ``preference``: DPO's ``sigmoid`` with cDPO label smoothing, ``ipo``,
``hinge``, ``robust``, and the reference-free ``simpo`` and ``orpo``; family ``kto``: KTO on
unpaired, desirable or undesirable examples); ``stage.py`` holds the ``dpo`` and ``kto`` stages
that compute those log-probs with the policy and its frozen reference and call the losses."""
