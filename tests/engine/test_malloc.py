"""keep_freed_memory(): glibc keeps large freed blocks for reuse instead of returning them to the kernel.

Each case runs in a fresh interpreter (the setting belongs to the process and cannot be undone), which loads the
module from its file without the package, so no torch import slows it down.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import l2vit.engine.malloc

pytestmark = pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
                                reason='glibc only')

# Allocates and frees a 64 MiB block (above glibc's default mmap threshold) a few times and counts the page
# faults of the later rounds: every round faults the block in afresh when glibc maps it, none when the heap keeps it.
_PROBE = r'''
import ctypes, importlib.util, json, resource, sys
spec = importlib.util.spec_from_file_location('malloc', sys.argv[2])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
keep_freed_memory = module.keep_freed_memory
result = keep_freed_memory() if sys.argv[1] == 'on' else (False, 'not asked')
again = keep_freed_memory() if sys.argv[1] == 'on' else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 << 20
def round_trip():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    round_trip()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({'applied': result[0], 'why': result[1], 'again': again, 'faults': faults}))
'''


def _probe(mode: str, **env: str) -> dict:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_') and k != 'GLIBC_TUNABLES'}
    full_env.update(env)
    out = subprocess.run([sys.executable, '-c', _PROBE, mode, l2vit.engine.malloc.__file__], env=full_env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_large_blocks_are_reused_without_page_faults():
    pages = (64 << 20) // 4096
    off, on = _probe('off'), _probe('on')
    assert off['faults'] >= 3 * pages * 0.9  # the default: fresh pages every round
    assert on['applied'] and on['faults'] < pages * 0.1, on
    assert on['again'] == [True, 'already set in this process']


@pytest.mark.parametrize('env', [{'MALLOC_TRIM_THRESHOLD_': '1000000'},
                                 {'GLIBC_TUNABLES': 'glibc.malloc.mmap_threshold=1000000'}])
def test_the_users_environment_wins(env):
    res = _probe('on', **env)
    assert not res['applied'] and 'left to the environment' in res['why'], res


def test_unrelated_tunables_do_not_count():
    assert _probe('on', GLIBC_TUNABLES='glibc.cpu.x86_shstk=0')['applied']


def test_trainers_apply_it_on_cpu_runs_only(monkeypatch):
    calls = []
    monkeypatch.setattr(l2vit.engine.malloc, 'keep_freed_memory', lambda: calls.append(1) or (True, 'done'))
    run = l2vit.engine.malloc.keep_freed_memory_for_run
    assert run(False, torch.device('cpu')) is None and run(True, torch.device('cuda', 0)) is None and not calls
    assert run(True, torch.device('cpu')) == 'keep_freed_memory: on, done' and calls == [1]
