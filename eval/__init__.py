"""Downstream evaluations of an exported DeepCluster network.

Each program reads the network only through its SavedModel (`MODEL_DIR/export`) and writes one
JSON file of metrics; `eval.metrics` holds the numeric scores they share, in plain numpy.
"""
