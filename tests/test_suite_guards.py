"""The suite's own guards: in CI a missing package, extension or fixture fails
instead of skipping, whatever spelling of CI the runner uses, and `.ci/run`
sets CI itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

PROBE = '''
from conftest import importorskip, skip_or_fail

def test_missing_package():
    importorskip("rwkvkit_no_such_package")

def test_missing_extension():
    skip_or_fail("the extension could not be built")
'''


def _run(tmp_path, ci):
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO / "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    return res.returncode, res.stdout


@pytest.mark.parametrize("ci", ["true", "TRUE", "1", "yes", "Yes"])
def test_skips_fail_in_ci(tmp_path, ci):
    rc, out = _run(tmp_path, ci)
    assert rc == 1 and "2 failed" in out, out
    assert "a skip is a failure in CI" in out


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_skips_skip_elsewhere(tmp_path, ci):
    rc, out = _run(tmp_path, ci)
    assert rc == 0 and "2 skipped" in out, out


def test_ci_script_sets_ci_and_forces_avx2():
    script = (REPO / ".ci" / "run").read_text()
    assert "export CI=true" in script
    assert "RWKVKIT_TEST_ISA=avx2" in script
