"""Models that ship with tpcluster (ported to cluster.parallel_layers)."""
