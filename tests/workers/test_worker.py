"""RankWorker's plan messages: what rank 0 broadcasts arrives whole on every other rank."""

from __future__ import annotations

import dataclasses
import pickle

from dist_infer.engine.sampling import SamplingParams
from dist_infer.workers.worker import SeqChunk, StepPlan


def test_plan_survives_the_broadcast_pickle_with_every_chunk_field():
    chunk = SeqChunk(7, [11, 12, 13], 40, [3, 9], sample=False, sampling=SamplingParams(temperature=0.7, seed=5),
                     prompt_targets=[12, 13])
    # Every field differs from its default, so a field the chunk's compact pickle dropped would show.
    assert all(getattr(chunk, f.name) != f.default for f in dataclasses.fields(SeqChunk)
               if f.default is not dataclasses.MISSING)
    plan = StepPlan([chunk, SeqChunk(8, [5], 90, [])], preempted=[2], finished=[4], return_logits=True,
                    share_tokens=True, pipeline_depth=2)
    assert pickle.loads(pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)) == plan
