"""capworks: the command line and offline checkpoint tooling that ties producer and workers."""
