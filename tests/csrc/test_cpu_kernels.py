"""Building and loading l2vit's CPU kernels: the name carries the instruction set, a failed build warns once and
falls back, and the environment switch turns them off."""
from __future__ import annotations

import pytest

import l2vit.csrc as csrc


def test_builds_and_loads():
    module = csrc.cpu_kernels()
    assert module is not None
    assert module.__name__ == f'l2vit_cpu_{csrc._isa().lower()}'
    assert hasattr(module, 'depthwise_weight_grad')
    assert csrc.cpu_kernels() is module  # loaded once


@pytest.mark.parametrize('value, enabled', [('0', False), ('off', False), ('False', False), ('1', True), ('', True)])
def test_environment_switch(monkeypatch, value, enabled):
    monkeypatch.setenv('L2VIT_CPU_KERNELS', value)
    assert csrc.cpu_kernels_enabled() is enabled
    if not enabled:
        assert csrc.cpu_kernels() is None


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(csrc, '_module', None)
    monkeypatch.setattr(csrc, '_failed', False)
    monkeypatch.setattr(csrc, '_SOURCES', [tmp_path / 'missing.cpp'])
    monkeypatch.setattr(csrc, '_isa', lambda: 'TEST_MISSING')
    with pytest.warns(RuntimeWarning, match='could not build its CPU kernels'):
        assert csrc.cpu_kernels() is None
    assert csrc.cpu_kernels() is None  # no second attempt, no second warning


def test_ninja_from_the_pip_package_is_found(monkeypatch):
    import os
    import shutil

    import ninja
    monkeypatch.setenv('PATH', '/nonexistent')
    csrc._put_ninja_on_path()
    assert os.environ['PATH'].split(os.pathsep)[0] == ninja.BIN_DIR
    assert shutil.which('ninja')
