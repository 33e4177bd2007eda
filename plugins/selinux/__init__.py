"""vmconfine's built-in selinux driver."""
