# -*- test-case-name: tests.test_install -*-
"""``twistd mailx`` is found after a regular and after an editable install.

The twistd plugin lives in ``twisted/plugins/`` outside the ``mailx``
package, which setuptools drops silently with ``packages = find:`` and which
a default editable install hides from Twisted's plugin scan (research notes
section 7).  Each test installs a copy of this checkout into a fresh
virtualenv (``--system-site-packages`` supplies the dependencies, so no
network is needed) and runs twistd from an unrelated directory.
"""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

from twisted.trial import unittest

REPO = Path(__file__).resolve().parents[1]


def copy_checkout(target: Path) -> Path:
    """The project's own files, without build leftovers or caches."""
    ignore = shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", "_trial_temp*", "var", ".hypothesis", "bench"
    )
    shutil.copytree(REPO, target, ignore=ignore)
    return target


class InstallTests(unittest.TestCase):
    timeout = 600

    def make_venv(self) -> tuple[Path, Path]:
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        env = base / "venv"
        venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env)
        return base, env / "bin" / "python"

    def pip_install(self, python: Path, *args: str) -> None:
        subprocess.run(
            [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
             "--no-index", "--quiet", *args],
            check=True,
            capture_output=True,
            # pip of the outer interpreter, whose site-packages the venv sees
            env={"PYTHONPATH": "", "PATH": f"{python.parent}:/usr/bin:/bin"},
        )

    def assert_twistd_finds_plugin_in(self, python: Path, root: Path, cwd: Path) -> None:
        code = (
            "import sys\n"
            "from twisted.application.service import IServiceMaker\n"
            "from twisted.plugin import getPlugins\n"
            "makers = [p for p in getPlugins(IServiceMaker) if p.tapname == 'mailx']\n"
            "import twisted.plugins.mailx_plugin as plugin, mailx\n"
            "print(len(makers), plugin.__file__, mailx.__file__)\n"
        )
        result = subprocess.run(
            [str(python), "-c", code], cwd=cwd, capture_output=True, text=True, check=True
        )
        count, plugin_file, package_file = result.stdout.split()
        self.assertEqual(count, "1")
        self.assertTrue(plugin_file.startswith(str(root)), plugin_file)
        self.assertTrue(package_file.startswith(str(root)), package_file)
        twistd = subprocess.run(
            [str(python), "-c", "from twisted.scripts.twistd import run; run()", "mailx", "--help"],
            cwd=cwd,
            capture_output=True,
            text=True,
        )
        self.assertEqual(twistd.returncode, 0, twistd.stderr)
        self.assertIn("--config", twistd.stdout)

    def test_regular_install(self) -> None:
        base, python = self.make_venv()
        checkout = copy_checkout(base / "src")
        self.pip_install(python, str(checkout))
        self.assert_twistd_finds_plugin_in(python, base / "venv", cwd=base)

    def test_editable_install_as_the_readme_gives_it(self) -> None:
        base, python = self.make_venv()
        checkout = copy_checkout(base / "src")
        self.pip_install(python, "-e", str(checkout), "--config-settings", "editable_mode=strict")
        self.assert_twistd_finds_plugin_in(python, checkout, cwd=base)


