"""vmconfine's built-in cgroups driver."""
