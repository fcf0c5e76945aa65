"""Booting and running a model starts no subprocess and opens no network connection.

TransformerLens 4.3's own boot path runs ``pip install torchvision`` in a subprocess
when a processor fails to load; vlens builds its bridges another way and must never
reach that code. Every family's tiny checkpoint is booted, run, cached and generated
from while subprocess creation and socket connections raise.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
import torch

from tests.tiny.families import FAMILY_BUILDERS
from vlens import HookedVLM


class SideEffect(AssertionError):
    pass


@pytest.fixture()
def forbid_side_effects(monkeypatch):
    def refuse(*args, **kwargs):
        raise SideEffect(f"vlens tried to start a process or open a connection: {args[:2]!r}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(os, "system", refuse)
    for name in ("posix_spawn", "posix_spawnp", "fork", "execv", "execve"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("family", sorted(FAMILY_BUILDERS))
def test_boot_and_run_without_subprocess_or_network(family, tmp_path, photo, forbid_side_effects):
    path = FAMILY_BUILDERS[family](tmp_path / family)
    model = HookedVLM.from_pretrained(path, device="cpu")
    inputs = model.prepare(photo, "what is in the image ?", answer="a red circle .")
    with torch.no_grad():
        model(inputs)
        model.run_with_cache(inputs)
    model.generate(inputs, max_new_tokens=2)
