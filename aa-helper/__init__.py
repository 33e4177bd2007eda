"""vmconfine-aa-helper: the only code that writes or loads AppArmor profiles."""
