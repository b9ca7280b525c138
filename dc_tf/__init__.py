"""dc_tf: DeepCluster (Caron et al., ECCV 2018) and DeepCluster-v2 in TensorFlow 2 / Keras 3.

The training core (what `python -m dc_tf.train` runs):
  train        the phases of a run: configuration and data, model, callbacks, fit, final
               clustering, export
  methods      DeepCluster, the supervised baseline and DeepCluster-v2 behind one interface
  config, train_flags   the frozen configuration, its checks, and the absl flags that build it
  run_dir      RunDir: the run folder's paths and record; resume: claiming and resuming it
  distribute   Workers: the tf.distribute strategy and what keeps the workers in step
  model, models/, optim   the Keras models with their train_step, the backbones, the schedules
  recluster, prototypes, features   the labellers: feature pass and clustering of each epoch
  data/        the training pipelines and the class-balanced sampler
  checkpoint, monitor, report, console, failpoints, export

The programs built on a run and its export, which the training core does not import
(tests/test_architecture.py):
  assign       new images into the clusters of an export
  clusters     sizes, purity and folders of links of a run's clusters
  visualize    filters, top images, clusters and the embedding projector (visualization/)

What evaluation shares with training (datasets, transforms, clustering numerics) is in dc_core;
the evaluations (eval) read only the export.
"""
