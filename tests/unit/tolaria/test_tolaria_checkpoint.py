"""Checkpoints: a fresh model + optimizer restored from disk continues exactly like the original,
even when kernels were grafted in another order than the model's (optimizer groups reordered)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import esper
from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec
from esper.core import MorphableModel
from esper.errors import ConfigurationError
from esper.execution import InMemoryArtifactSource
from esper.tolaria.checkpoint import (
    DamagedCheckpointError,
    capture,
    load_checkpoint,
    load_resume_checkpoint,
    optimizer_group_tags,
    restore_optimizer,
    restore_rng,
    save_checkpoint,
)
from esper.tolaria.run_folder import RunFolder

SPEC = BlueprintSpec(family="residual_mlp", params={"hidden": 8, "activation": "relu"})


def _fresh(source: InMemoryArtifactSource) -> tuple[MorphableModel, torch.optim.Optimizer]:
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model = esper.wrap(host, seeds_per_layer=2, kernel_source=source, blend_steps=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.attach_optimizer(optimizer, lr=5e-3)
    return model, optimizer


def _train(model: MorphableModel, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(8, 6)  # global RNG: part of what a checkpoint restores
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.step()


def _grow_out_of_order(
    source: InMemoryArtifactSource,
) -> tuple[MorphableModel, torch.optim.Optimizer]:
    model, optimizer = _fresh(source)
    _train(model, optimizer, 3)
    for layer in ("2", "0"):  # the later layer first: groups end up out of model order
        data, meta = create_artifact(SPEC, model.layer(layer).target())
        source.add(data)
        model.load_kernel_sync(layer, seed_idx=1, kernel_artifact_id=meta.kernel_id)
        _train(model, optimizer, 4)
    return model, optimizer


def test_resumed_model_and_optimizer_continue_bit_for_bit(tmp_path: Path) -> None:
    source = InMemoryArtifactSource()
    model, optimizer = _grow_out_of_order(source)
    generator = torch.Generator().manual_seed(5)
    generator.manual_seed(7)
    directory = save_checkpoint(
        tmp_path / "epoch-0001",
        capture(
            epoch=1,
            step=model.global_step,
            model=model,
            optimizer=optimizer,
            data_generator=generator,
            metrics_position=0,
            growth={"controller": {"x": 1}},
        ),
    )
    assert optimizer_group_tags(optimizer) == [None, "2:1", "0:1"]
    _train(model, optimizer, 5)  # the uninterrupted run goes on

    resumed, resumed_optimizer = _fresh(source)
    checkpoint = load_checkpoint(directory)
    resumed.load_state_dict(checkpoint.model)
    assert optimizer_group_tags(resumed_optimizer) == [None, "0:1", "2:1"]  # model order
    restore_optimizer(resumed_optimizer, checkpoint)
    restore_rng(checkpoint, torch.Generator())
    _train(resumed, resumed_optimizer, 5)

    assert optimizer_group_tags(resumed_optimizer) == [None, "2:1", "0:1"]
    assert checkpoint.growth == {"controller": {"x": 1}}
    original, restored = model.state_dict(), resumed.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert [g["lr"] for g in resumed_optimizer.param_groups] == [1e-2, 5e-3, 5e-3]


def test_a_plain_optimizer_load_matches_groups_by_seed(tmp_path: Path) -> None:
    source = InMemoryArtifactSource()
    model, optimizer = _grow_out_of_order(source)
    saved = optimizer.state_dict()
    resumed, resumed_optimizer = _fresh(source)
    resumed.load_state_dict(model.state_dict())

    resumed_optimizer.load_state_dict(saved)  # attached: groups put in the saved order first

    shapes_match = [
        resumed_optimizer.state[p]["exp_avg"].shape == p.shape
        for group in resumed_optimizer.param_groups
        for p in group["params"]
    ]
    assert all(shapes_match)


def test_restore_refuses_an_optimizer_with_other_groups(tmp_path: Path) -> None:
    source = InMemoryArtifactSource()
    model, optimizer = _grow_out_of_order(source)
    checkpoint = capture(
        epoch=1,
        step=1,
        model=model,
        optimizer=optimizer,
        data_generator=torch.Generator(),
        metrics_position=0,
    )
    _, other_optimizer = _fresh(source)  # no kernels: no kernel groups

    with pytest.raises(ConfigurationError, match="do not match the checkpoint"):
        restore_optimizer(other_optimizer, checkpoint)


def test_every_random_stream_is_restored(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(11)
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    model, optimizer = _fresh(InMemoryArtifactSource())
    directory = save_checkpoint(
        tmp_path / "ckpt",
        capture(
            epoch=0,
            step=0,
            model=model,
            optimizer=optimizer,
            data_generator=generator,
            metrics_position=0,
        ),
    )
    expected = (
        torch.rand(3),
        torch.rand(3, generator=generator),
        random.random(),
        float(np.random.rand()),
    )
    other = torch.Generator()

    restore_rng(load_checkpoint(directory), other)

    assert torch.equal(torch.rand(3), expected[0])
    assert torch.equal(torch.rand(3, generator=other), expected[1])
    assert (random.random(), float(np.random.rand())) == expected[2:]


def test_files_are_tensors_for_weights_only_and_json(tmp_path: Path) -> None:
    model, optimizer = _fresh(InMemoryArtifactSource())
    directory = save_checkpoint(
        tmp_path / "ckpt",
        capture(
            epoch=4,
            step=40,
            model=model,
            optimizer=optimizer,
            data_generator=torch.Generator(),
            metrics_position=123,
        ),
    )

    tensors = torch.load(directory / "tensors.pt", weights_only=True)
    state = json.loads((directory / "state.json").read_text())
    assert set(tensors) == {"model", "optimizer", "torch_rng", "data_rng", "growth"}
    assert (state["epoch"], state["step"], state["metrics_position"]) == (4, 40, 123)
    assert not (tmp_path / ".ckpt.tmp").exists()


def test_an_incomplete_checkpoint_is_reported(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()

    with pytest.raises(DamagedCheckpointError, match=r"state\.json is missing"):
        load_checkpoint(tmp_path / "ckpt")


def test_tensors_in_the_growth_state_go_to_the_tensor_file(tmp_path: Path) -> None:
    model, optimizer = _fresh(InMemoryArtifactSource())
    growth = {"policy": {"w": torch.arange(3.0)}, "steps": [1, {"t": torch.ones(2)}], "n": 4}
    directory = save_checkpoint(
        tmp_path / "ckpt",
        capture(
            epoch=1,
            step=1,
            model=model,
            optimizer=optimizer,
            data_generator=torch.Generator(),
            metrics_position=0,
            growth=growth,
        ),
    )

    restored = load_checkpoint(directory).growth

    state = json.loads((directory / "state.json").read_text())
    assert state["growth"]["policy"] == {"w": {"__tensor__": "0"}}
    assert torch.equal(restored["policy"]["w"], torch.arange(3.0))
    assert torch.equal(restored["steps"][1]["t"], torch.ones(2))
    assert (restored["steps"][0], restored["n"]) == (1, 4)


# -- damaged checkpoints (issue 9, item 13) ------------------------------------------------------


def _saved(directory: Path, epoch: int = 3) -> Path:
    model, optimizer = _fresh(InMemoryArtifactSource())
    return save_checkpoint(
        directory,
        capture(
            epoch=epoch,
            step=10 * epoch,
            model=model,
            optimizer=optimizer,
            data_generator=torch.Generator(),
            metrics_position=0,
            growth={"policy": {"w": torch.ones(2)}},
        ),
    )


def _edit_state(key: str, value: object) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / "state.json"
        state = json.loads(path.read_text())
        if value is _DELETE:
            del state[key]
        else:
            state[key] = value
        path.write_text(json.dumps(state))

    return edit


_DELETE = object()


def _truncate(name: str, keep: float) -> Callable[[Path], None]:
    def cut(directory: Path) -> None:
        data = (directory / name).read_bytes()
        (directory / name).write_bytes(data[: int(len(data) * keep)])

    return cut


def _python_rng_edit(directory: Path) -> None:
    path = directory / "state.json"
    state = json.loads(path.read_text())
    state["python_rng"][1] = state["python_rng"][1][:100]  # 100 of 625 words
    path.write_text(json.dumps(state))


def _numpy_rng_edit(directory: Path) -> None:
    path = directory / "state.json"
    state = json.loads(path.read_text())
    state["numpy_rng"][2] = 9000  # position past the 624 words
    path.write_text(json.dumps(state))


def _growth_ref_edit(directory: Path) -> None:
    path = directory / "state.json"
    state = json.loads(path.read_text())
    state["growth"]["policy"]["w"] = {"__tensor__": "7"}  # no such tensor
    path.write_text(json.dumps(state))


def _foreign_tensors(directory: Path) -> None:
    torch.save({"model": {}}, directory / "tensors.pt")


def _bad_rng_tensor(directory: Path) -> None:
    tensors = torch.load(directory / "tensors.pt", weights_only=True)
    tensors["torch_rng"] = torch.zeros(7, dtype=torch.uint8)
    torch.save(tensors, directory / "tensors.pt")


DAMAGES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "empty tensors.pt": (_truncate("tensors.pt", 0.0), "tensors.pt", "is empty"),
    "truncated tensors.pt": (_truncate("tensors.pt", 0.5), "tensors.pt", "cannot be read"),
    "tensors.pt of something else": (_foreign_tensors, "tensors.pt", "should hold"),
    "a torch RNG state of 7 bytes": (_bad_rng_tensor, "tensors.pt", "torch_rng"),
    "empty state.json": (_truncate("state.json", 0.0), "state.json", "is empty"),
    "truncated state.json": (_truncate("state.json", 0.5), "state.json", "not JSON"),
    "no epoch": (_edit_state("epoch", _DELETE), "state.json", "epoch"),
    "epoch 'three'": (_edit_state("epoch", "three"), "state.json", "epoch"),
    "epoch 3.5": (_edit_state("epoch", 3.5), "state.json", "epoch"),
    "epoch true": (_edit_state("epoch", True), "state.json", "epoch"),
    "epoch -5": (_edit_state("epoch", -5), "state.json", "epoch"),
    "epoch of another folder": (_edit_state("epoch", 4), "state.json", "folder is epoch 3"),
    "step -1": (_edit_state("step", -1), "state.json", "step"),
    "a Python RNG state of 100 words": (_python_rng_edit, "state.json", "python_rng"),
    "a NumPy RNG position past the state": (_numpy_rng_edit, "state.json", "numpy_rng"),
    "a growth tensor that is not there": (_growth_ref_edit, "state.json", "does not hold"),
    "an unknown entry": (_edit_state("surprise", 1), "state.json", "surprise"),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=str)
def test_a_damaged_checkpoint_is_one_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    edit, file_name, problem = DAMAGES[damage]
    directory = _saved(tmp_path / "epoch-0003")
    edit(directory)

    with pytest.raises(DamagedCheckpointError) as raised:
        load_checkpoint(directory)

    message = str(raised.value)
    assert str(directory / file_name) in message and problem in message, message
    assert "\n" not in message and len(message) < 500


def _run_with_checkpoints(root: Path, epochs: list[int]) -> RunFolder:
    folder = RunFolder(root / "run")
    folder.path.mkdir()
    (folder.path / "config.yaml").write_text("{}\n")
    for epoch in epochs:
        _saved(folder.checkpoint_dir(epoch), epoch=epoch)
    return folder


def test_resume_falls_back_to_the_latest_intact_checkpoint_with_a_warning(tmp_path: Path) -> None:
    folder = _run_with_checkpoints(tmp_path, [1, 2, 3])
    (folder.checkpoint_dir(3) / "tensors.pt").write_bytes(b"")
    (folder.checkpoint_dir(2) / "state.json").write_text('{"epoch": -5}')

    checkpoint, warnings = load_resume_checkpoint(folder)

    assert checkpoint is not None and checkpoint.epoch == 1
    assert str(folder.checkpoint_dir(3) / "tensors.pt") in warnings[0]
    assert str(folder.checkpoint_dir(2) / "state.json") in warnings[1]
    assert warnings[-1].endswith("epoch 1")


def test_resume_with_every_checkpoint_damaged_is_an_error(tmp_path: Path) -> None:
    folder = _run_with_checkpoints(tmp_path, [1, 2])
    for epoch in (1, 2):
        (folder.checkpoint_dir(epoch) / "state.json").unlink()

    with pytest.raises(DamagedCheckpointError, match="no intact checkpoint"):
        load_resume_checkpoint(folder)


def test_resume_from_a_chosen_epoch(tmp_path: Path) -> None:
    folder = _run_with_checkpoints(tmp_path, [1, 2, 3])

    checkpoint, warnings = load_resume_checkpoint(folder, epoch=2)

    assert checkpoint is not None and checkpoint.epoch == 2 and warnings == []
    with pytest.raises(
        ConfigurationError, match=r"no checkpoint of epoch 7 \(checkpoints: 1, 2, 3\)"
    ):
        load_resume_checkpoint(folder, epoch=7)
    (folder.checkpoint_dir(2) / "tensors.pt").write_bytes(b"junk")
    with pytest.raises(DamagedCheckpointError, match="epoch-0002"):  # asked for: no fallback
        load_resume_checkpoint(folder, epoch=2)
