"""Downstream evaluations of an exported DeepCluster network.

Each program reads the network only through its SavedModel (`MODEL_DIR/export`) and writes one
JSON file of metrics; `eval.metrics` holds the numeric scores they share, in plain numpy. Where an
evaluation needs the architecture (VOC fine-tuning, detection) it reads it from the export's
assets/dc_tf_export.json (`dc_core.export_info.read_export_info`), and for an export without that file
recognises a dc_tf architecture by its endpoint shapes, with a warning. Nothing here imports
dc_tf.
"""
