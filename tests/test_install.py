# -*- test-case-name: tests.test_install -*-
"""``twistd mailx`` is found after a regular and after an editable install.

The twistd plugin lives in ``twisted/plugins/`` outside the ``mailx``
package, which setuptools drops silently with ``packages = find:`` and which
a default editable install hides from Twisted's plugin scan (research notes
section 7).  Each test installs a copy of this checkout into a fresh
virtualenv and runs twistd from an unrelated directory.

The nested virtualenv borrows its dependencies (Twisted, setuptools, pip)
from the interpreter running the tests, so no network is needed.  Not with
``--system-site-packages``: from inside a virtualenv that shows the *base*
interpreter's packages, not the running one's, and a fresh ``python3 -m venv``
then fails with ``invalid command 'bdist_wheel'`` or no Twisted at all.  A
``.pth`` file lists the running interpreter's site directories instead; its
lines are plain paths, so the ``.pth`` files inside them (the outer editable
install of mailx) are not run and cannot shadow the copy under test.
"""

from __future__ import annotations

import os
import shutil
import site
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


def running_site_dirs() -> list[str]:
    """The site directories of the interpreter running the tests, in order."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if os.path.isdir(d)]


def clean_env(python: Path) -> dict[str, str]:
    """This environment without PYTHON* variables, the venv's bin/ first.

    ``trial -j`` and the README's ``PYTHONPATH=$PWD`` put a checkout on
    ``PYTHONPATH``; inherited, it would hand the nested interpreter that
    checkout's plugin instead of the installed one.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    return env


def run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), *args], cwd=cwd, capture_output=True, text=True, env=clean_env(python)
    )


class InstallTests(unittest.TestCase):
    timeout = 600

    def make_venv(self) -> tuple[Path, Path]:
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        env = base / "venv"
        venv.EnvBuilder(with_pip=False).create(env)
        python = env / "bin" / "python"
        purelib = run(
            python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=base
        ).stdout.strip()
        Path(purelib, "outer-site.pth").write_text("\n".join(running_site_dirs()) + "\n")
        return base, python

    def pip_install(self, python: Path, *args: str) -> None:
        result = run(
            python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
            "--quiet", *args,
            cwd=python.parent,
        )
        self.assertEqual(result.returncode, 0, f"pip install failed:\n{result.stdout}{result.stderr}")

    def assert_twistd_finds_plugin_in(self, python: Path, root: Path, cwd: Path) -> None:
        code = (
            "import sys\n"
            "from twisted.application.service import IServiceMaker\n"
            "from twisted.plugin import getPlugins\n"
            "makers = [p for p in getPlugins(IServiceMaker) if p.tapname == 'mailx']\n"
            "import twisted.plugins.mailx_plugin as plugin, mailx\n"
            "print(len(makers), plugin.__file__, mailx.__file__)\n"
        )
        result = run(python, "-c", code, cwd=cwd)
        self.assertEqual(result.returncode, 0, result.stderr)
        count, plugin_file, package_file = result.stdout.split()
        self.assertEqual(count, "1")
        self.assertTrue(plugin_file.startswith(str(root)), plugin_file)
        self.assertTrue(package_file.startswith(str(root)), package_file)
        twistd = run(
            python, "-c", "from twisted.scripts.twistd import run; run()", "mailx", "--help", cwd=cwd
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


