"""Cluster layer: generic master/worker strategies and the Dask cluster."""
