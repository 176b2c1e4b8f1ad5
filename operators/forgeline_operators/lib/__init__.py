"""Helpers several stage kinds share (statistics, per-row evaluation records): a leaf below every
operator folder, so stage folders need not import each other for them."""
