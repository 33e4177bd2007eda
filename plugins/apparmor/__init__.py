"""vmconfine's built-in apparmor driver."""
