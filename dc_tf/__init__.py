"""dc_tf: DeepCluster (Caron et al., ECCV 2018) in TensorFlow 2 / Keras 3."""
