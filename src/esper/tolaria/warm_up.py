"""Warm-up: compile the catalog kernels a run may germinate before its first step.

:func:`queue_catalog_compiles` queues every compatible catalog blueprint for every seeded layer
(``growth.precompile``); :func:`wait_for_compiles` waits for the queued jobs before step 1
(``growth.warm_start``), queueing one warm-up compile when nothing was queued. The first compile
of a process pays for ``torch.export``'s start-up (and a worker process for its own): waiting
for it here keeps that out of the training steps, so no germination waits for a cold compiler
at its due boundary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from esper.blueprints import is_compatible
from esper.core import MorphableModel
from esper.tamiyo.observation import BLUEPRINT_CATALOG
from esper.tezzeret import find_or_enqueue, wait_for_jobs
from esper.tezzeret.kernel_requests import FINISHED
from esper.urza import ArtifactLibrary

logger = logging.getLogger(__name__)


def queue_catalog_compiles(library: ArtifactLibrary, model: MorphableModel) -> list[str]:
    """Queue every compatible catalog blueprint for every seeded layer of ``model``; return the
    ids of the jobs queued (kernels the library holds already need none)."""
    queued = []
    for name in model.layer_names:
        target = model.layer(name).target()
        for option in BLUEPRINT_CATALOG:
            if is_compatible(option.spec, target):
                request = find_or_enqueue(library, option.spec, target)
                if request.job is not None:
                    queued.append(request.job.job_id)
    return queued


def wait_for_compiles(
    library: ArtifactLibrary,
    model: MorphableModel,
    job_ids: list[str],
    *,
    timeout_s: float = 300.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> float:
    """Wait until ``job_ids`` have finished (none: queue one warm-up compile for the first
    seeded layer and wait for it); return the seconds waited.

    Args:
        library: where the jobs were queued.
        model: the wrapped model.
        job_ids: the jobs to wait for.
        timeout_s: start training anyway after this long.
        on_progress: called with ``(finished, total)`` compiles whenever the count changes
            (first with 0 finished).
    """
    if not job_ids:
        target = model.layer(model.layer_names[0]).target()
        option = next(o for o in BLUEPRINT_CATALOG if is_compatible(o.spec, target))
        request = find_or_enqueue(library, option.spec, target)
        job_ids = [request.job.job_id] if request.job is not None else []
    started = time.perf_counter()
    jobs = wait_for_jobs(library, job_ids, timeout_s=timeout_s, on_progress=on_progress)
    waited = time.perf_counter() - started
    pending = [j for j in job_ids if j not in jobs or jobs[j].status not in FINISHED]
    if pending:
        logger.warning(
            "%d compile jobs still pending after %.0f s; training starts anyway (is a "
            "Tezzeret worker running?)",
            len(pending),
            waited,
        )
    return waited
