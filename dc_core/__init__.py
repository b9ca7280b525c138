"""What training (`dc_tf`) and evaluation (`eval`) both stand on, depending on neither: datasets
and image sources, image transforms, clustering numerics (k-means, PCA whitening, NMI), atomic
file writes, and the error classes whose messages reach the user."""
