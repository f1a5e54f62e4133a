"""dask worker preload: import every chunk task's module (and so torch) when a worker starts.

A worker otherwise imports them with its first chunk, 3-5 s on this 2-core machine (``python -X
importtime``: torch ~2 s, cloud-volume, xarray), paid inside the first stage of every run. At start
up the import runs while the Prefect API starts (:func:`flows.runtime.api_and_cluster`).

The default LocalCluster preloads it (:func:`flows.runtime.cluster`); for workers started by hand or
by a cluster class, pass it the same way: ``dask worker --preload tasks.preload ...``, or
``cluster_kwargs: {worker_extra_args: ["--preload", "tasks.preload"]}`` for dask-jobqueue.
"""

from __future__ import annotations

import tasks.coarse
import tasks.detect
import tasks.encode
import tasks.finetune
import tasks.normalize
import tasks.pyramid
import tasks.render
import tasks.solve
import tasks.torn  # noqa: F401
