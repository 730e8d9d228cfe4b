"""Fitting probes and steering vectors from examples on the running server (the admin API's fit endpoints).

- bodies.py: the request bodies, checked (bounds, types, labels), a 4xx naming the field otherwise;
- estimate.py: pooling a text's residual rows, the logistic-regression probe (scikit-learn) with its held-out
  AUROC and accuracy, the difference-of-means (CAA) vector;
- reading.py: the residual read of one text through the engine (an internal observation plan, read back
  from the request's channel);
- run.py: one fit end to end (read every text, pool, fit, save under the first runtime root, register it
  through the admin's runtime load).

All of it runs in the API process and imports nothing of steer_plugin.engine.
"""
