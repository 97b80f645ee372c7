"""How plugins reach rlhf: the hooks they implement (:mod:`.hookspecs`), the manager that loads
built-ins, entry points and a config's modules (:mod:`.manager`), and the registry of what they
registered (:mod:`.registry`)."""
