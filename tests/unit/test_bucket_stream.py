"""The one thread-fed bucket stream (`rollout.bucket_stream`) behind both fan-outs of a weight
sync: `EngineGroup` (engines in this process) and `EngineActor` (an engine in a Ray actor, here
called directly). An aborted stream raises the same `SyncAborted` inside every engine, so one
`except SyncAborted` catches it wherever the engine runs."""
import pickle

import pytest
import torch

from eureka_megatron.rollout.bucket_stream import BucketFeed, SyncAborted
from eureka_megatron.rollout.buckets import flatten_bucket
from eureka_megatron.rollout.engine_group import EngineGroup
from eureka_megatron.rollout.ray_engine import EngineActor, RemoteEngine


def packed(i):
    """What RemoteEngine sends its actor for the bucket [("w", tensor([i]))]."""
    return flatten_bucket([("w", torch.tensor([float(i)]))])


def values(bucket):
    return [(name, t.tolist()) for name, t in bucket]


class RecordingEngine:
    """Takes every bucket, records it, and records the SyncAborted that stopped it."""
    weight_layout = "hf"

    def __init__(self, fail_at: int | None = None):
        self.fail_at = fail_at
        self.seen, self.aborted, self.weight_version = [], None, 0

    def update_weights(self, buckets, version):
        self.weight_version = None
        try:
            for i, bucket in enumerate(buckets):
                if i == self.fail_at:
                    raise ValueError(f"bad bucket {i}")
                self.seen.append(bucket)
        except SyncAborted as e:
            self.aborted = e
            raise
        self.weight_version = version


def broken():
    yield [("w", 1)]
    raise OSError("export failed")


def test_one_sync_aborted_from_both_fan_outs():
    engines = [RecordingEngine(), RecordingEngine()]
    with pytest.raises(OSError, match="export failed"):
        EngineGroup(engines).update_weights(broken(), version=1)
    actor = EngineActor(f"{__name__}:RecordingEngine", {})
    actor.begin_update(2)
    actor.load_bucket(packed(1))
    actor.abort_update()
    for engine in engines + [actor.engine]:
        assert isinstance(engine.aborted, SyncAborted) and engine.weight_version is None
    assert [b for b in engines[0].seen] == [[("w", 1)]]
    assert [values(b) for b in actor.engine.seen] == [[("w", [1.0])]]
    assert actor.last_sync_buckets == 1


def test_the_actor_feeds_one_bucket_per_call_and_reports_the_engines_error():
    actor = EngineActor(f"{__name__}:RecordingEngine", {})
    actor.begin_update(3)
    for i in range(3):
        actor.load_bucket(packed(i))
        assert len(actor.engine.seen) == i + 1  # taken before the call returns
    assert actor.finish_update() == 3 and actor.last_sync_buckets == 3

    actor = EngineActor(f"{__name__}:RecordingEngine", {"fail_at": 1})
    actor.begin_update(4)
    actor.load_bucket(packed(0))
    with pytest.raises(ValueError, match="bad bucket 1"):
        actor.load_bucket(packed(1))
    actor.abort_update()
    assert actor.engine.weight_version is None and actor.engine.aborted is None


def test_an_engine_that_stops_reading_early_is_an_error():
    class Quitter(RecordingEngine):
        def update_weights(self, buckets, version):
            next(iter(buckets))

    feed = BucketFeed(Quitter(), 1, name="quitter")
    assert feed.ready()
    feed.put([("w", 0)])
    assert not feed.ready()
    assert "returned before the last bucket" in str(feed.wait())


def test_a_remote_engine_ships_the_weights_not_the_buffers_they_view():
    """The export hands out views of the trainer's parameter buffer; Ray pickles a tensor with
    its whole storage, so RemoteEngine packs each bucket into fresh buffers first."""
    actor = EngineActor(f"{__name__}:RecordingEngine", {})
    remote = RemoteEngine.__new__(RemoteEngine)
    shipped = []

    def call(method, *args, **kwargs):  # what Ray does to the arguments, minus the transport
        payload = pickle.dumps(args)
        shipped.append(len(payload))
        return getattr(actor, method)(*pickle.loads(payload), **kwargs)

    remote._call = call
    params = torch.arange(1_000_000, dtype=torch.float32)  # 4 MB, like a DDP param buffer
    buckets = [[("norm.weight", params[:8]), ("bias", params[8:16].view(2, 4))],
               [("head.weight", params[100:164].view(8, 8))]]
    remote.update_weights(iter(buckets), version=5)
    assert actor.engine.weight_version == 5
    assert [values(b) for b in actor.engine.seen] == [values(b) for b in buckets]
    assert max(shipped) < 10_000  # the bytes of 80 floats and their names, not 4 MB
