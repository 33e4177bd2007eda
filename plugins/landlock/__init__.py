"""vmconfine's built-in landlock driver."""
