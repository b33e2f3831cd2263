"""Task plugins: one file per task family, registered with ``@tasks.register``."""
