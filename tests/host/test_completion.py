"""Shell completion as a bash user gets it.

tests/host/test_cli.py drives click's completion in-process. Here the whole
path runs for real: the installed ``dmsnap`` console script writes its bash
completion with ``--install-completion bash`` into a scratch $HOME, a real
``bash`` sources what was installed (via ``~/.bashrc``, as an interactive
shell does) and calls the completion function the way readline does on
<Tab>, and the console script answers through ``_DMSNAP_COMPLETE``. Pool
and volume names come from a running control socket (the real server in
front of a small fake manager).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from dmsnap import cli
from dmsnap.daemon.server import PeerPolicy, Server

DMSNAP = str(Path(sys.executable).parent / "dmsnap")
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="bash not installed")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A scratch $HOME with dmsnap's bash completion installed the documented way."""
    h = tmp_path / "home"
    h.mkdir()
    r = subprocess.run(
        [DMSNAP, "--install-completion", "bash"],
        env=_env(h),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "bash completion installed" in r.stdout
    return h


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("_DMSNAP", "COMP_", "DMSNAP_"))}
    env["HOME"] = str(home)
    # The completion function runs "dmsnap" by name, as in a user's shell.
    env["PATH"] = f"{Path(DMSNAP).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DMSNAP_SOCKET"] = "/nonexistent/dmsnapd.sock"
    env.update(extra)
    return env


def complete(home: Path, line: str, **env: str) -> list[str]:
    """What bash offers for <Tab> at the end of ``line``."""
    words = line.split(" ")  # a trailing space means a new, empty word
    assert words[0] == "dmsnap"
    script = (
        # An interactive shell reads ~/.bashrc: that must be enough.
        'source "$HOME/.bashrc"\n'
        "spec=$(complete -p dmsnap) || exit 99\n"
        "func=${spec#*-F }; func=${func%% *}\n"
        'COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 ))\n'
        'COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}\n'
        '"$func" dmsnap "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    assert BASH is not None
    r = subprocess.run(
        [BASH, "--noprofile", "--norc", "-c", script, "bash", *words],
        env=_env(home, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, (line, r.returncode, r.stderr)
    assert r.stderr == "", (line, r.stderr)  # never noise in the user's terminal
    return [w for w in r.stdout.splitlines() if w]


def subcommands(group: str) -> list[str]:
    """The group's visible subcommands, from the CLI's own definition."""
    cmd = typer.main.get_command(cli.app).commands[group]  # type: ignore[attr-defined]
    return sorted(n for n, c in cmd.commands.items() if not c.hidden)


def test_install_completion_writes_a_script_bashrc_sources(home: Path) -> None:
    script = home / ".bash_completions" / "dmsnap.sh"
    assert "complete -o default -F _dmsnap_completion dmsnap" in script.read_text()
    assert f"source '{script}'" in (home / ".bashrc").read_text()
    # --show-completion prints the same script for the same shell.
    shown = subprocess.run(
        [DMSNAP, "--show-completion", "bash"],
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == script.read_text().strip()
    # Installing twice does not stack source lines in ~/.bashrc.
    again = subprocess.run(
        [DMSNAP, "--install-completion", "bash"],
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert (home / ".bashrc").read_text().count("dmsnap.sh") == 1


def test_commands_and_subcommands_complete(home: Path) -> None:
    assert complete(home, "dmsnap po") == ["pool"]
    assert complete(home, "dmsnap sn") == ["snapshot"]
    assert set(complete(home, "dmsnap ")) >= {"pool", "volume", "snapshot", "status", "daemon"}
    # Exactly the group's subcommands (whatever gets added later), which
    # include at least these.
    pool = complete(home, "dmsnap pool ")
    assert sorted(pool) == subcommands("pool")
    assert {"create", "list", "show", "destroy"} <= set(pool)
    assert complete(home, "dmsnap pool d") == ["destroy"]
    snapshot = complete(home, "dmsnap snapshot ")
    assert sorted(snapshot) == subcommands("snapshot")
    assert {"create", "list", "delete", "activate", "deactivate", "restore"} <= set(snapshot)
    assert complete(home, "dmsnap pool create tank --back") == ["--backend"]
    assert sorted(complete(home, "dmsnap pool create tank --backend ")) == ["classic", "thin"]
    # No daemon here: names simply have no candidates, and no error shows.
    assert complete(home, "dmsnap pool show ") == []


class _Names:
    """Just enough of a Manager for completion to list names."""

    def pool_list(self) -> list[dict[str, Any]]:
        return [{"name": "tank"}, {"name": "fast"}]

    def volume_list(self, pool: str | None = None) -> list[dict[str, Any]]:
        vols = [("tank", "db"), ("tank", "logs"), ("fast", "scratch")]
        return [{"pool": p, "name": v} for p, v in vols if pool in (None, p)]

    def snapshot_list(self, pool: str | None = None, vol: str | None = None) -> list[Any]:
        return [{"pool": "tank", "volume": "db", "name": "nightly"}]


@pytest.fixture
def socket_path() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="dmsnap-compl")  # short: AF_UNIX paths are limited
    path = os.path.join(d, "d.sock")
    server = Server(path, policy=PeerPolicy(frozenset({os.getuid()})))
    server.bind()
    t = threading.Thread(target=server.serve, args=(_Names(),), daemon=True)
    t.start()
    yield path
    server.request_stop()
    t.join(timeout=10)
    server.close()
    shutil.rmtree(d, ignore_errors=True)


def test_names_complete_from_the_running_daemon(home: Path, socket_path: str) -> None:
    sock = {"DMSNAP_SOCKET": socket_path}
    assert sorted(complete(home, "dmsnap pool show ", **sock)) == ["fast", "tank"]
    assert complete(home, "dmsnap pool destroy t", **sock) == ["tank"]
    assert complete(home, "dmsnap volume delete tank/l", **sock) == ["tank/logs"]
    assert complete(home, "dmsnap snapshot activate tank/db@", **sock) == ["tank/db@nightly"]


def test_names_complete_from_the_socket_given_with_option(home: Path, socket_path: str) -> None:
    # $DMSNAP_SOCKET points nowhere (see _env): only --socket can find the daemon.
    assert complete(home, f"dmsnap --socket {socket_path} pool show f") == ["fast"]
