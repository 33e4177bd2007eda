"""vmconfine's built-in dac driver."""
