"""The HTTP search service (``runtime/serve.py``), in layers that can be replaced one at a time:

* ``settings``  -- batching settings and request limits (frozen dataclasses);
* ``executor``  -- what runs a batch: one ``Executor`` around a ``Searcher`` (one engine, an ensemble or
  shards; appends swapped in atomically); ``types``: the ``Hits`` and ``Appended`` it answers;
* ``batcher``   -- dynamic batching: a bounded queue and worker threads that merge concurrent requests
  into one executor call and split the results back; knows nothing of HTTP or of the model;
* ``requests``  -- parsing and validating request bodies into queries (errors name field, limit, value);
* ``service``   -- ties an executor (loaded in the background), a batcher and the Prometheus metrics;
* ``app``       -- the FastAPI application: routes, status codes, error bodies, auth, body limits.
"""
