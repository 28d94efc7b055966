"""The embedded library (SQLite + local folder): blueprints, kernels, jobs, leases, statistics."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from esper.contracts import (
    BlueprintSpec,
    BlueprintStatus,
    CompileJobStatus,
    KernelCharacterization,
    KernelTarget,
)
from esper.errors import ArtifactIntegrityError, ConfigurationError, KernelNotFoundError
from esper.urza import ArtifactLibrary, BlueprintNotFoundError, JobNotFoundError, JobStateError
from esper.urza.blob_stores import LocalBlobStore
from esper.urza.errors import KernelMetadataMismatchError
from esper.urza.storage_library import StorageLibrary
from factories import conv2d_target


def _characterization(latency_us: float) -> KernelCharacterization:
    return KernelCharacterization(
        device="cpu",
        latency_us_median=latency_us,
        flops_per_sample=100,
        batch_sizes_validated=(1, 3),
        exportable=True,
    )


# ---------------------------------------------------------------------------------------------
# Blueprints


def test_storage_library_satisfies_the_protocol(library: StorageLibrary) -> None:
    assert isinstance(library, ArtifactLibrary)


def test_submitting_a_blueprint_twice_keeps_one_record(
    library: StorageLibrary, spec: BlueprintSpec, clock
) -> None:
    first = library.submit_blueprint(spec)
    clock.advance(5.0)
    again = library.submit_blueprint(BlueprintSpec(family=spec.family, params=dict(spec.params)))
    named = library.submit_blueprint(spec, name="wide residual")
    renamed = library.submit_blueprint(spec, name="another name")

    assert first.blueprint_id == spec.blueprint_id == again.blueprint_id
    assert again.created_at == first.created_at == clock.now - 5.0
    assert first.name is None and named.name == "wide residual"
    assert renamed.name == "wide residual"  # a later name never renames
    assert len(library.list_blueprints()) == 1
    assert library.stats().blueprints_by_status[BlueprintStatus.SUBMITTED] == 1


def test_blueprint_status_changes_and_listing_by_status(library: StorageLibrary, clock) -> None:
    ids = []
    for hidden in (8, 16, 32):
        clock.advance(1.0)
        spec = BlueprintSpec(family="residual_mlp", params={"hidden": hidden})
        ids.append(library.submit_blueprint(spec).blueprint_id)

    valid = library.set_blueprint_status(ids[0], BlueprintStatus.VALID)
    invalid = library.set_blueprint_status(ids[1], BlueprintStatus.INVALID, "NaN in forward")

    assert valid.status is BlueprintStatus.VALID and valid.reason is None
    assert invalid.status is BlueprintStatus.INVALID and invalid.reason == "NaN in forward"
    assert library.get_blueprint(ids[1]) == invalid
    assert [r.blueprint_id for r in library.list_blueprints(BlueprintStatus.SUBMITTED)] == [ids[2]]
    assert [r.blueprint_id for r in library.list_blueprints(BlueprintStatus.INVALID)] == [ids[1]]
    assert [r.blueprint_id for r in library.list_blueprints()] == ids
    counts = library.stats().blueprints_by_status
    assert counts == {
        BlueprintStatus.SUBMITTED: 1,
        BlueprintStatus.VALID: 1,
        BlueprintStatus.INVALID: 1,
    }


def test_unknown_and_malformed_blueprint_ids(library: StorageLibrary) -> None:
    with pytest.raises(BlueprintNotFoundError, match="submit_blueprint"):
        library.get_blueprint("a" * 64)
    with pytest.raises(BlueprintNotFoundError):
        library.set_blueprint_status("a" * 64, BlueprintStatus.VALID)
    with pytest.raises(ConfigurationError, match="sha256"):
        library.get_blueprint("../../etc/passwd")


# ---------------------------------------------------------------------------------------------
# Kernels


def test_kernel_round_trip_bytes_metadata_and_stream(library: StorageLibrary, make_kernel) -> None:
    artifact, metadata = make_kernel(100_000)

    stored = library.put_kernel(artifact, metadata)
    chunks = list(library.iter_kernel_chunks(metadata.kernel_id, chunk_size=30_000))

    assert stored == metadata
    assert library.get_kernel_bytes(metadata.kernel_id) == artifact
    assert library.get_kernel_metadata(metadata.kernel_id) == metadata
    assert [len(c) for c in chunks] == [30_000, 30_000, 30_000, 10_000]
    assert b"".join(chunks) == artifact
    # The kernel's blueprint was registered on the way in.
    assert library.get_blueprint(metadata.blueprint.blueprint_id).spec == metadata.blueprint


def test_putting_the_same_kernel_twice_is_idempotent(library: StorageLibrary, make_kernel) -> None:
    artifact, metadata = make_kernel(2048)
    first = library.put_kernel(artifact, metadata)
    characterized = metadata.model_copy(
        update={"characterization": _characterization(latency_us=12.0)}
    )
    relabelled = metadata.model_copy(update={"parameter_count": 7})

    second = library.put_kernel(artifact, characterized)
    with pytest.raises(KernelMetadataMismatchError, match="parameter_count"):
        library.put_kernel(artifact, relabelled)

    assert second == first == metadata  # the first metadata is kept
    stats = library.stats()
    assert (stats.kernels, stats.kernel_bytes) == (1, 2048)


def test_unknown_kernel_raises_kernel_not_found(library: StorageLibrary) -> None:
    missing = "f" * 64
    with pytest.raises(KernelNotFoundError, match=missing):
        library.get_kernel_bytes(missing)
    with pytest.raises(KernelNotFoundError):
        library.get_kernel_metadata(missing)
    with pytest.raises(KernelNotFoundError):
        library.iter_kernel_chunks(missing)  # raised when opened, before any iteration


def test_flipped_byte_in_the_blob_is_an_integrity_error(
    library: StorageLibrary, make_kernel
) -> None:
    artifact, metadata = make_kernel(10_000)
    library.put_kernel(artifact, metadata)
    assert isinstance(library.blobs, LocalBlobStore)
    path = library.blobs.path_for(metadata.kernel_id)
    corrupted = bytearray(path.read_bytes())
    corrupted[1234] ^= 0x01
    path.write_bytes(bytes(corrupted))
    corrupted_digest = hashlib.sha256(corrupted).hexdigest()

    with pytest.raises(ArtifactIntegrityError) as caught:
        library.get_kernel_bytes(metadata.kernel_id)
    message = str(caught.value)
    assert metadata.kernel_id in message and corrupted_digest in message

    stream = library.iter_kernel_chunks(metadata.kernel_id, chunk_size=4096)
    received = []
    with pytest.raises(ArtifactIntegrityError, match=corrupted_digest):
        for chunk in stream:
            received.append(chunk)
    assert sum(map(len, received)) == 10_000  # every chunk came, then the check failed

    # Putting the artifact again repairs the stored copy.
    library.put_kernel(artifact, metadata)
    assert library.get_kernel_bytes(metadata.kernel_id) == artifact


def test_put_rejects_size_or_digest_mismatch_and_stores_nothing(
    library: StorageLibrary, make_kernel
) -> None:
    artifact, metadata = make_kernel(1000)
    with pytest.raises(ArtifactIntegrityError, match="size_bytes=1000"):
        library.put_kernel(artifact[:999], metadata)
    tampered = bytes([artifact[0] ^ 0xFF]) + artifact[1:]
    with pytest.raises(ArtifactIntegrityError) as caught:
        library.put_kernel(tampered, metadata)
    assert hashlib.sha256(tampered).hexdigest() in str(caught.value)
    assert metadata.kernel_id in str(caught.value)

    assert library.stats().kernels == 0
    assert isinstance(library.blobs, LocalBlobStore)
    assert not library.blobs.exists(metadata.kernel_id)
    assert [p for p in library.blobs.root.rglob("*") if p.is_file()] == []


def test_object_is_written_before_its_metadata_row(
    library: StorageLibrary, make_kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifact, metadata = make_kernel(512)

    def blob_store_down(key: str, file: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(library.blobs, "put_file", blob_store_down)
    with pytest.raises(OSError, match="disk full"):
        library.put_kernel(artifact, metadata)
    assert library.find_kernels() == []  # no row points at bytes that were never written

    monkeypatch.undo()

    def metadata_store_down(**_: object) -> None:
        raise RuntimeError("database gone")

    monkeypatch.setattr(library.metadata, "insert_kernel", metadata_store_down)
    with pytest.raises(RuntimeError, match="database gone"):
        library.put_kernel(artifact, metadata)
    assert library.blobs.exists(metadata.kernel_id)  # the object went first


def test_find_kernels_by_blueprint_target_device_and_dtype(
    library: StorageLibrary, make_kernel, linear_target: Callable[..., KernelTarget]
) -> None:
    wide = BlueprintSpec(family="residual_mlp", params={"hidden": 64})
    narrow = BlueprintSpec(family="lowrank_adapter", params={"rank": 4})
    conv = conv2d_target(16, 8)
    kernels = {
        "wide_cpu": make_kernel(blueprint=wide, target=linear_target(16, 8)),
        "wide_cuda": make_kernel(blueprint=wide, target=linear_target(16, 8, device="cuda")),
        "wide_other_shape": make_kernel(blueprint=wide, target=linear_target(32, 8)),
        "narrow_bf16": make_kernel(blueprint=narrow, target=linear_target(16, 8), dtype="bfloat16"),
        "narrow_conv": make_kernel(blueprint=narrow, target=conv),
    }
    for artifact, metadata in kernels.values():
        library.put_kernel(artifact, metadata)
    ids = {name: metadata.kernel_id for name, (_, metadata) in kernels.items()}

    def found(**filters: object) -> set[str]:
        return {m.kernel_id for m in library.find_kernels(**filters)}  # type: ignore[arg-type]

    assert found() == set(ids.values())
    assert found(blueprint_id=wide.blueprint_id) == {
        ids["wide_cpu"],
        ids["wide_cuda"],
        ids["wide_other_shape"],
    }
    # Geometry matches whatever the requested target's dtype and device are.
    assert found(target=linear_target(16, 8, device="cuda")) == {
        ids["wide_cpu"],
        ids["wide_cuda"],
        ids["narrow_bf16"],
    }
    assert found(target=linear_target(16, 8), device="cuda") == {ids["wide_cuda"]}
    assert found(target=conv) == {ids["narrow_conv"]}
    assert found(dtype="bfloat16") == {ids["narrow_bf16"]}
    assert found(blueprint_id=narrow.blueprint_id, target=linear_target(32, 8)) == set()


# ---------------------------------------------------------------------------------------------
# Compile jobs


def test_job_lifecycle_enqueue_claim_complete(
    library: StorageLibrary, spec: BlueprintSpec, make_kernel, linear_target, clock
) -> None:
    blueprint_id = library.submit_blueprint(spec).blueprint_id
    target = linear_target()
    job = library.enqueue_job(blueprint_id, target, init_seed=3)
    duplicate = library.enqueue_job(blueprint_id, target, init_seed=3)
    clock.advance(1.0)
    other_seed = library.enqueue_job(blueprint_id, target, init_seed=4)

    assert job.status is CompileJobStatus.QUEUED and job.attempts == 0
    assert duplicate.job_id == job.job_id  # an equal pending job is reused
    assert other_seed.job_id != job.job_id

    clock.advance(1.0)
    claimed = library.claim_job("worker-a", lease_seconds=60)
    assert claimed is not None and claimed.job_id == job.job_id  # oldest first
    assert claimed.status is CompileJobStatus.CLAIMED
    assert (claimed.worker_id, claimed.attempts) == ("worker-a", 1)
    assert claimed.claimed_at == clock.now
    assert claimed.lease_expires_at == clock.now + 60

    second = library.claim_job("worker-b", lease_seconds=60)
    assert second is not None and second.job_id == other_seed.job_id
    assert library.claim_job("worker-c") is None

    artifact, metadata = make_kernel(blueprint=spec, target=target)
    with pytest.raises(KernelNotFoundError, match="put_kernel"):
        library.complete_job(job.job_id, "worker-a", metadata.kernel_id)
    library.put_kernel(artifact, metadata)
    with pytest.raises(JobStateError, match="worker-a"):
        library.complete_job(job.job_id, "worker-b", metadata.kernel_id)

    done = library.complete_job(job.job_id, "worker-a", metadata.kernel_id)
    again = library.complete_job(job.job_id, "worker-a", metadata.kernel_id)
    failed = library.fail_job(other_seed.job_id, "worker-b", "shape check failed")

    assert done.status is CompileJobStatus.SUCCEEDED and done.kernel_id == metadata.kernel_id
    assert done.lease_expires_at is None
    assert again == done
    assert failed.status is CompileJobStatus.FAILED and failed.error == "shape check failed"
    assert library.get_blueprint(blueprint_id).status is BlueprintStatus.VALID
    assert library.get_job(job.job_id) == done
    assert [j.job_id for j in library.list_jobs(CompileJobStatus.FAILED)] == [other_seed.job_id]
    assert len(library.list_jobs(blueprint_id=blueprint_id)) == 2
    with pytest.raises(JobStateError, match="succeeded"):
        library.fail_job(job.job_id, "worker-a", "too late")
    # A new job for the same key can be queued once the earlier one finished.
    assert library.enqueue_job(blueprint_id, target, init_seed=3).job_id != job.job_id


def test_enqueue_needs_a_submitted_blueprint_and_unknown_jobs_raise(
    library: StorageLibrary, linear_target
) -> None:
    with pytest.raises(BlueprintNotFoundError):
        library.enqueue_job("b" * 64, linear_target())
    with pytest.raises(JobNotFoundError):
        library.get_job("0" * 32)
    with pytest.raises(ConfigurationError, match="32 lowercase hex"):
        library.get_job("../jobs")
    with pytest.raises(ConfigurationError, match="lease_seconds"):
        library.claim_job("worker", lease_seconds=0)
    with pytest.raises(ConfigurationError, match="worker id"):
        library.claim_job("")


def test_a_lapsed_lease_is_reclaimed_by_another_worker(
    library: StorageLibrary, spec: BlueprintSpec, make_kernel, linear_target, clock
) -> None:
    blueprint_id = library.submit_blueprint(spec).blueprint_id
    job = library.enqueue_job(blueprint_id, linear_target())
    library.claim_job("dies-mid-compile", lease_seconds=30)

    clock.advance(29.0)
    assert library.claim_job("rescuer", lease_seconds=30) is None  # lease still held
    clock.advance(2.0)
    reclaimed = library.claim_job("rescuer", lease_seconds=30)

    assert reclaimed is not None and reclaimed.job_id == job.job_id
    assert (reclaimed.worker_id, reclaimed.attempts) == ("rescuer", 2)
    assert reclaimed.lease_expires_at == clock.now + 30
    artifact, metadata = make_kernel(blueprint=spec)
    library.put_kernel(artifact, metadata)
    with pytest.raises(JobStateError, match="reclaimed"):
        library.complete_job(job.job_id, "dies-mid-compile", metadata.kernel_id)
    assert library.complete_job(job.job_id, "rescuer", metadata.kernel_id).attempts == 2


def test_renewing_a_lease_keeps_the_job(
    library: StorageLibrary, spec: BlueprintSpec, linear_target, clock
) -> None:
    library.enqueue_job(library.submit_blueprint(spec).blueprint_id, linear_target())
    job = library.claim_job("slow-worker", lease_seconds=10)
    assert job is not None

    clock.advance(8.0)
    renewed = library.renew_lease(job.job_id, "slow-worker", lease_seconds=10)
    clock.advance(8.0)  # 16 s after the claim: past the first lease, inside the renewed one

    assert renewed.lease_expires_at == clock.now + 2.0
    assert library.claim_job("other", lease_seconds=10) is None
    with pytest.raises(JobStateError):
        library.renew_lease(job.job_id, "other", lease_seconds=10)


def test_stats_count_everything(
    library: StorageLibrary, spec: BlueprintSpec, make_kernel, linear_target
) -> None:
    empty = library.stats()
    assert (empty.kernels, empty.kernel_bytes) == (0, 0)
    assert set(empty.jobs_by_status.values()) == {0}
    assert set(empty.blueprints_by_status.values()) == {0}

    blueprint_id = library.submit_blueprint(spec).blueprint_id
    for size in (1000, 3000):
        library.put_kernel(*make_kernel(size))
    for seed in range(3):
        library.enqueue_job(blueprint_id, linear_target(), init_seed=seed)
    first = library.claim_job("w")
    library.claim_job("w")
    assert first is not None
    library.fail_job(first.job_id, "w", "boom")

    stats = library.stats()
    assert (stats.kernels, stats.kernel_bytes) == (2, 4000)
    assert stats.blueprints_by_status[BlueprintStatus.SUBMITTED] == 1
    assert stats.jobs_by_status == {
        CompileJobStatus.QUEUED: 1,
        CompileJobStatus.CLAIMED: 1,
        CompileJobStatus.SUCCEEDED: 0,
        CompileJobStatus.FAILED: 1,
    }
