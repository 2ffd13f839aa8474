"""Local mode: `spinctl run` and `spinctl demo` run a SPINRun on one machine, no cluster.

The operator's own pure reconciler decides every step; each Job it would create runs here as
local processes with the same runtime argv (`spin_operator.steps`). Modules:

* `backend`   step attempts as process groups (the local "Jobs"), their exit states, logs;
* `state`     the status persisted between invocations, so a rerun resumes;
* `preflight` bad input named by field, before any work starts;
* `podenv`    what a local process gets of `spec.pod` (its env vars), and a note for the rest;
* `display`   stages, progress bars and per-iteration results on the terminal;
* `runner`    `spinctl run`: passes of the operator's driver (driver.py) until the run ends;
* `actions`   `LocalCluster`, the driver's cluster here: observe, fetch what the reconciler asks, act;
* `tracking`  MLflow for local runs (the parent run, iteration runs, model versions);
* `status_cmd` `spinctl status`: a local run's status read back from its storage;
* `demo`      `spinctl demo`: the runtime's `demo-build` (a subprocess), then a run.
"""
