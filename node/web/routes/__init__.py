"""The JSON API's routes, one module per resource (studies, jobs, worklist, models, outbox, stats,
inference) and the health probes."""
