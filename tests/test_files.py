"""steer_plugin.files, the one rule for opening a file the server was pointed at: regular files only (a named
pipe is refused at once, never waited on), bounded reads, and under `confined(roots)` nothing outside the roots,
whichever way the path gets there (a link, `..`, a loader option)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from steer_plugin.catalog import load_labels
from steer_plugin.config import ConfigError
from steer_plugin.files import FileRefused, confined, open_regular, read_bounded, real_path
from steer_plugin.sae import read_sae_header
from steer_plugin.sae.errors import SAELoadError


def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "labels.json"
    os.mkfifo(fifo)
    done = []

    def read():
        try:
            read_bounded(fifo, 1024)
        except FileRefused as err:
            done.append(err)

    reader = threading.Thread(target=read, daemon=True)
    start = time.monotonic()
    reader.start()
    reader.join(5)
    assert done and "not a regular file" in str(done[0]) and time.monotonic() - start < 5
    with pytest.raises(ConfigError) as err:  # the labels loader, as start-up and admin loads call it
        load_labels(fifo)
    assert err.value.field == "labels" and "not a regular file" in str(err.value)


def test_devices_folders_and_big_files_are_refused(tmp_path):
    for path in ("/dev/zero", tmp_path):
        with pytest.raises(FileRefused):
            open_regular(path, None)
    big = tmp_path / "big.json"
    big.write_bytes(b"[" + b"0," * 2000 + b"0]")
    with pytest.raises(FileRefused) as err:
        read_bounded(big, 1000)
    assert "larger" in str(err.value)
    assert read_bounded(big, 10_000).startswith(b"[0,")


def test_a_nul_byte_is_a_refusal_not_a_crash():
    with pytest.raises(FileRefused) as err:
        real_path("/tmp/a\0b")
    assert err.value.status == 400


def test_confined_refuses_links_and_dotdot_out_of_the_roots(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.json").write_text('{"0": "OUTSIDE-SECRET-1 api_key=hunter2"}')
    (root / "ok.json").write_text('{"0": "fine"}')
    (root / "link.json").symlink_to(outside / "secret.json")
    (root / "dirlink").symlink_to(outside)
    with confined([str(root)]):
        assert load_labels(root / "ok.json")[0] == {0: "fine"}
        for path in (
            root / "link.json",
            root / "dirlink" / "secret.json",
            root / ".." / "outside" / "secret.json",
        ):
            with pytest.raises(ConfigError) as err:
                load_labels(path)
            assert err.value.status == 403 and "OUTSIDE-SECRET" not in str(err.value)
    assert load_labels(root / "link.json")[0]  # outside confined(): links are followed (start-up config)


def write_sparsify(folder, d_in=4, d_sae=8):
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "num_latents": d_sae, "k": 2}))
    save_file(
        {
            "encoder.weight": torch.zeros(d_sae, d_in),
            "encoder.bias": torch.zeros(d_sae),
            "W_dec": torch.zeros(d_sae, d_in),
            "b_dec": torch.zeros(d_in),
        },
        str(folder / "sae.safetensors"),
    )


def test_a_loader_option_cannot_leave_the_folder(tmp_path):
    root = tmp_path / "root"
    write_sparsify(root / "sae" / "layers.1")
    write_sparsify(tmp_path / "outside" / "layers.2")
    for hookpoint in ("../../outside/layers.2", str(tmp_path / "outside" / "layers.2"), ".."):
        with pytest.raises(SAELoadError) as err:
            read_sae_header(root / "sae", "sparsify", hookpoint=hookpoint)
        assert "must be the name of a folder" in str(err.value)
    assert read_sae_header(root / "sae", "sparsify", hookpoint="layers.1").d_sae == 8


def test_files_inside_the_folder_that_link_out_are_refused(tmp_path):
    root = tmp_path / "root"
    write_sparsify(tmp_path / "outside" / "layers.2")
    folder = root / "sae" / "layers.2"
    folder.mkdir(parents=True)
    for name in ("cfg.json", "sae.safetensors"):
        (folder / name).symlink_to(tmp_path / "outside" / "layers.2" / name)
    assert read_sae_header(folder, "sparsify").d_sae == 8  # start-up: the operator's own links are followed
    with confined([str(root)]), pytest.raises(FileRefused) as err:
        read_sae_header(folder, "sparsify")
    assert err.value.status == 403
