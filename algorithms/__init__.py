"""Learning-algorithm plugins: one file each, registered with ``@algorithms.register``."""
