"""What a DeepCluster network and its clusters learned: the library behind `dc_tf.visualize`.

  montage           numpy grids of uint8 images, PIL captions, PNG and TensorBoard output
  trained           a run's configuration, its restored backbone and its images
  ascent            filter visualisation by gradient ascent (docs/protocols.md §7)
  activations       channel scores of a dataset and its top-activating images (docs/protocols.md §7)
  cluster_montage   montages of random clusters, and the training callback that logs them
  projector         TensorBoard embedding projector files

Nothing is imported here, so that training (which needs only the callback) stays light.
"""
