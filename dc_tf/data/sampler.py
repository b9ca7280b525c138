"""Class-balanced rejection sampling over example indices, before any image is decoded.

Each epoch DeepCluster samples images uniformly over the non-empty clusters of the current
pseudo-labels. Over a uniform stream of indices, accepting index i with probability
p[c(i)] = n_min / n_c(i) makes every non-empty cluster equally likely: cluster c is proposed with
probability n_c / N and accepted with n_min / n_c, so its share is n_min / N for every c. The
filter runs on batches of indices (cheap vectorised ops), so a skewed clustering costs extra index
draws, never extra decoding.

The pseudo-labels and acceptance probabilities are variables written by the ReclusterCallback;
the pipeline is built once and reads their current values. Every draw is stateless and keyed by
the stream's key (the run's seed and the epoch, `stream_key`), so one key gives one stream
whatever the parallelism, and an epoch's stream starts anew from its own key: no block of
indices filtered with an earlier clustering's probabilities outlives the epoch it was drawn for.
"""

import tensorflow as tf

from dc_core.sources import Source

# Indices proposed per step for random-access sources: large, since a skewed clustering accepts
# few (n_min * k / N) and each step has a fixed cost (bench/sampler.py: 65536 drew twice as
# fast as 4096). Record sources batch their encoded records, so those blocks stay small.
_PROPOSAL_BLOCK = 65536
_RECORD_BLOCK = 4096


def acceptance(labels: tf.Variable, accept: tf.Variable, indices: tf.Tensor) -> tf.Tensor:
    """Acceptance probability of each index; examples labelled -1 (unreadable) get 0.

    Args:
      labels: int32 [N] pseudo-labels variable (-1 = excluded).
      accept: float32 [k] per-cluster acceptance probability variable.
      indices: int64 [B].
    Returns:
      float32 [B].
    """
    label = tf.gather(labels, indices)
    p = tf.gather(accept, tf.maximum(label, 0))
    return tf.where(label >= 0, p, tf.zeros_like(p))


def stream_key(seed: int, epoch: tf.Tensor, salt: int = 0) -> tf.Tensor:
    """int64 [2], the stateless seed of one epoch's draws (`salt` tells apart their uses)."""
    fold = tf.random.experimental.stateless_fold_in
    return fold(fold(tf.constant([seed, 0], tf.int64), tf.cast(epoch, tf.int64)), salt)


def accepted_pairs(source: Source, labels: tf.Variable, accept: tf.Variable,
                   key: tf.Tensor) -> tf.data.Dataset:
    """An endless stream of accepted (index, payload) pairs, still undecoded.

    Random-access sources propose blocks of indices drawn uniformly with replacement, so even a
    very skewed clustering (acceptance rate n_min * k / N) costs only cheap vectorised draws.
    Record sources propose their records in file order and are shuffled after acceptance, in a
    buffer of encoded records: rejected records are read but never decoded.

    Args:
      key: int64 [2], the stream's stateless seed (`stream_key`): the same key and variables
        give the same stream.
    """
    def uniform(shape, step, salt, **kwargs):
        fold = tf.random.experimental.stateless_fold_in
        return tf.random.stateless_uniform(shape, seed=fold(key, 2 * step + salt), **kwargs)

    def accepted(step, index):
        return uniform(tf.shape(index), step, 1) < acceptance(labels, accept, index)

    # Stateless draws keyed by the step: parallel blocks give the same stream, in order.
    if source.random_access:
        n = source.num_examples

        def propose(step):
            index = uniform([_PROPOSAL_BLOCK], step, 0, minval=0, maxval=n, dtype=tf.int64)
            index = tf.boolean_mask(index, accepted(step, index))
            return index, index  # the payload of a random-access source is its index
        return tf.data.Dataset.counter().map(
            propose, num_parallel_calls=tf.data.AUTOTUNE).unbatch()

    def keep(step, block):
        index, payload = block
        mask = accepted(step, index)
        return tf.boolean_mask(index, mask), tf.boolean_mask(payload, mask)
    pairs = source.triples().map(lambda index, payload, label: (index, payload))
    blocks = pairs.repeat().batch(_RECORD_BLOCK).enumerate()
    out = blocks.map(keep, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    return out.shuffle(10 * _RECORD_BLOCK, seed=key[0] ^ key[1])
