"""Live model monitoring (issue 18): one row per model run (record), input statistics (inputs),
drift against the validation reference kept in the manifest (drift, reference), the per-model
report behind the page, the JSON API and the Prometheus gauges (report, gauges, plots)."""
